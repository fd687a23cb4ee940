from transformers import AutoTokenizer

from loratune.data.encode import BUILTIN_TEMPLATES, IGNORE, Encoder, choose_template
from loratune.data.formats import Example, to_example
from loratune.data.prepare import fit_length


def _encoder(path, **kw):
    tok = AutoTokenizer.from_pretrained(path)
    return tok, Encoder(tok, choose_template(tok, kw.pop("chat_template", None)), **kw)


def test_prompt_tokens_are_masked_and_answer_ends_with_eos(tiny_model):
    tok, enc = _encoder(tiny_model)
    ex = to_example({"input": "send 3 mugs to Leeds", "output": "{\"quantity\": 3}"}, "input_output", {})
    ids, labels, start = enc.encode(ex)
    prompt = enc.prompt_ids(ex)
    answer = tok("{\"quantity\": 3}<|im_end|>", add_special_tokens=False).input_ids
    # the prompt is exactly what generation will see, and carries no loss
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
    # the answer and its end-of-turn token carry the loss, nothing after it
    assert ids[len(prompt):] == answer and labels[len(prompt):] == answer and start == len(prompt)
    assert ids[-1] == tok.eos_token_id


def test_train_on_inputs_labels_everything(tiny_model):
    _, enc = _encoder(tiny_model, train_on_inputs=True)
    ids, labels, _ = enc.encode(to_example({"input": "a b", "output": "c"}, "input_output", {}))
    assert labels == ids


def test_alpaca_without_chat_template_uses_plain_template_and_eos(tiny_plain_model):
    tok, enc = _encoder(tiny_plain_model)
    assert enc.template == BUILTIN_TEMPLATES["plain"]
    ex = to_example({"instruction": "Say hi", "input": "to Ann", "output": "hi Ann"}, "alpaca", {})
    ids, labels, _ = enc.encode(ex)
    assert tok.decode(ids) == "Say hi\n\nto Ann\nhi Ann<|endoftext|>"
    assert tok.decode([t for t in labels if t != IGNORE]) == "hi Ann<|endoftext|>"


def test_prompt_completion_is_raw_text_with_eos(tiny_model):
    tok, enc = _encoder(tiny_model)
    ids, labels, _ = enc.encode(Example(prompt="Q: two plus two?\nA:", completion=" four"))
    assert tok.decode(ids) == "Q: two plus two?\nA: four<|im_end|>"
    assert tok.decode([t for t in labels if t != IGNORE]) == " four<|im_end|>"


def test_truncation_policies():
    ids, labels = list(range(10)), [IGNORE] * 6 + [6, 7, 8, 9]
    assert fit_length(ids, labels, 6, 8, "truncate_prompt_left") == (ids[2:], labels[2:])
    assert fit_length(ids, labels, 6, 4, "truncate_prompt_left") is None  # the answer alone does not fit
    assert fit_length(ids, labels, 6, 8, "truncate_end") == (ids[:8], labels[:8])
    assert fit_length(ids, labels, 6, 8, "drop") is None
    assert fit_length(ids, labels, 6, 10, "drop") == (ids, labels)

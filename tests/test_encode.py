import pytest
from transformers import AutoTokenizer

from loratune.data.encode import BUILTIN_TEMPLATES, IGNORE, Encoder, choose_template
from loratune.data.formats import Example, RowError, to_example
from loratune.data.prepare import fit_length


def _encoder(path, **kw):
    tok = AutoTokenizer.from_pretrained(path)
    return tok, Encoder(tok, choose_template(tok, kw.pop("chat_template", None)), **kw)


def _one(enc, ex):
    """(ids, labels, last answer's start) of an example that is one training sequence."""
    (seq,) = enc.encode(ex)
    return seq.ids, seq.labels, seq.answer_start


def test_prompt_tokens_are_masked_and_answer_ends_with_eos(tiny_model):
    tok, enc = _encoder(tiny_model)
    ex = to_example({"input": "send 3 mugs to Leeds", "output": '{"quantity": 3}'}, "input_output", {})
    ids, labels, start = _one(enc, ex)
    prompt = enc.prompt_ids(ex)
    answer = tok('{"quantity": 3}<|im_end|>', add_special_tokens=False).input_ids
    # the prompt is exactly what generation will see, and carries no loss
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
    # the answer and its end-of-turn token carry the loss, nothing after it
    assert ids[len(prompt) :] == answer and labels[len(prompt) :] == answer and start == len(prompt)
    assert ids[-1] == tok.eos_token_id


def test_train_on_inputs_labels_everything(tiny_model):
    _, enc = _encoder(tiny_model, train_on_inputs=True)
    ids, labels, _ = _one(enc, to_example({"input": "a b", "output": "c"}, "input_output", {}))
    assert labels == ids


def test_alpaca_without_chat_template_uses_plain_template_and_eos(tiny_plain_model):
    tok, enc = _encoder(tiny_plain_model)
    assert enc.template == BUILTIN_TEMPLATES["plain"]
    ex = to_example({"instruction": "Say hi", "input": "to Ann", "output": "hi Ann"}, "alpaca", {})
    ids, labels, _ = _one(enc, ex)
    assert tok.decode(ids) == "Say hi\n\nto Ann\nhi Ann<|endoftext|>"
    assert tok.decode([t for t in labels if t != IGNORE]) == "hi Ann<|endoftext|>"


def test_prompt_completion_is_raw_text_with_eos(tiny_model):
    tok, enc = _encoder(tiny_model)
    ids, labels, _ = _one(enc, Example(prompt="Q: two plus two?\nA:", completion=" four"))
    assert tok.decode(ids) == "Q: two plus two?\nA: four<|im_end|>"
    assert tok.decode([t for t in labels if t != IGNORE]) == " four<|im_end|>"


def test_truncation_policies():
    ids, labels = list(range(10)), [IGNORE] * 6 + [6, 7, 8, 9]
    assert fit_length(ids, labels, 6, 8, "truncate_prompt_left") == (ids[2:], labels[2:])
    assert fit_length(ids, labels, 6, 4, "truncate_prompt_left") is None  # the answer alone does not fit
    assert fit_length(ids, labels, 6, 8, "truncate_end") == (ids[:8], labels[:8])
    assert fit_length(ids, labels, 6, 8, "drop") is None
    assert fit_length(ids, labels, 6, 10, "drop") == (ids, labels)


# --- multi-turn masking: exactly which token ids carry labels ----------------------------------------------------

TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "send mugs"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "to leeds"},
    {"role": "assistant", "content": "done"},
]


def _expected(tok, pieces):
    """ids and labels from literal (text, is_answer) pieces, each tokenized on its own."""
    ids, labels = [], []
    for text, is_answer in pieces:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if is_answer else [IGNORE] * len(piece)
    return ids, labels


CHATML_PIECES = [
    ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsend mugs<|im_end|>\n<|im_start|>assistant\n", False),
    ("ok<|im_end|>", True),
    ("\n<|im_start|>user\nto leeds<|im_end|>\n<|im_start|>assistant\n", False),
    ("done<|im_end|>", True),
]


@pytest.mark.parametrize(
    "fmt, row",
    [
        ("messages", {"messages": TURNS}),
        (
            "sharegpt",
            {
                "conversations": [
                    {
                        "from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]],
                        "value": t["content"],
                    }
                    for t in TURNS
                ]
            },
        ),
    ],
)
def test_multi_turn_labels_only_the_assistant_turns(tiny_model, fmt, row):
    tok, enc = _encoder(tiny_model)
    ids, labels, start = _one(enc, to_example(row, fmt, {}))
    expected_ids, expected_labels = _expected(tok, CHATML_PIECES)
    assert ids == expected_ids and labels == expected_labels
    # the same ids as the whole conversation tokenized at once, and exactly two labelled spans
    assert ids == tok(enc.render(TURNS).rstrip(), add_special_tokens=False).input_ids
    labelled = [i for i, y in enumerate(labels) if y != IGNORE]
    first, second = (
        tok("ok<|im_end|>", add_special_tokens=False).input_ids,
        tok("done<|im_end|>", add_special_tokens=False).input_ids,
    )
    p0 = len(tok(CHATML_PIECES[0][0], add_special_tokens=False).input_ids)
    p1 = len(tok(CHATML_PIECES[2][0], add_special_tokens=False).input_ids)
    assert labelled == list(range(p0, p0 + len(first))) + list(range(p0 + len(first) + p1, len(ids)))
    assert start == len(ids) - len(second)
    assert ids[:start] == enc.prompt_ids(to_example(row, fmt, {}))  # generation sees the training prefix


def test_multi_turn_train_on_inputs_labels_everything(tiny_model):
    _, enc = _encoder(tiny_model, train_on_inputs=True)
    ids, labels, _ = _one(enc, Example(messages=TURNS))
    assert labels == ids


def test_an_opening_assistant_turn_is_context(tiny_model):
    tok, enc = _encoder(tiny_model)
    ids, labels, _ = _one(enc, Example(messages=[{"role": "assistant", "content": "welcome"}, *TURNS[1:3]]))
    assert tok.decode([t for t in labels if t != IGNORE]) == "ok<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>assistant\nwelcome<|im_end|>")


# --- templates -----------------------------------------------------------------------------------------------


def test_builtin_templates_on_a_model_without_one(tiny_plain_model, tmp_path):
    ex = Example(messages=TURNS[1:3])
    tok, enc = _encoder(tiny_plain_model, chat_template="alpaca")
    ids, labels, _ = _one(enc, ex)
    assert tok.decode(ids) == "### Instruction:\nsend mugs\n\n### Response:\nok<|endoftext|>"
    assert tok.decode([t for t in labels if t != IGNORE]) == "ok<|endoftext|>"
    # chatml on a tokenizer whose end-of-sequence token is not <|im_end|>: the turn's own end token ends the
    # answer (no end-of-sequence token after it) and generation stops there too
    tok, enc = _encoder(tiny_plain_model, chat_template="chatml")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, labels, _ = _one(enc, ex)
    assert (
        ids[-1] == im_end and im_end in enc.end_ids and tok.decode([t for t in labels if t != IGNORE]) == "ok<|im_end|>"
    )
    # a Jinja file
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    )
    tok, enc = _encoder(tiny_plain_model, chat_template=str(tmp_path / "t.jinja"))
    ids, labels, _ = _one(enc, ex)
    assert tok.decode(ids) == "USER: send mugs\nASSISTANT: ok<|endoftext|>"
    assert tok.decode([t for t in labels if t != IGNORE]) == "ok<|endoftext|>"


def test_unknown_template_and_non_prefix_template(tiny_model, tmp_path):
    with pytest.raises(
        RowError, match=r"chat_template = 'llama9': not a file and not a built-in \(plain, chatml, alpaca\)"
    ):
        _encoder(tiny_model, chat_template="llama9")
    # a template that closes earlier turns differently once more follow, with no generation prompt to tell where
    # the answer begins: refused, naming the turn, what the template did, and fixes this tokenizer has tokens for
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}[{{ m['content'] }}]{% endif %}"
        "{% endfor %}"
    )
    _, enc = _encoder(tiny_model, chat_template=str(tmp_path / "t.jinja"))
    with pytest.raises(
        RowError,
        match=r"^turn 1 \(an answer.*does not render this answer after its generation "
        r"prompt.*built-in this tokenizer has the tokens for \(chatml, plain, alpaca\)$",
    ):
        enc.encode(Example(messages=TURNS[1:]))


# --- tokenizers that mark the start of their input, and add BOS ------------------------------------------------


def _sentencepiece_style_tokenizer(template):
    """Metaspace pre-tokenizer (a leading "▁" on the first word of every call) and BOS added, as Llama 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from loratune.modeling.tiny import corpus_lines

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(
        corpus_lines() + ["[INST] [/INST] <|user|> <|assistant|>"],
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = template
    return fast


def test_answer_tokens_are_those_of_the_whole_text_and_bos_is_added_once():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
        "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tok = _sentencepiece_style_tokenizer(template)
    enc = Encoder(tok, template)
    ex = Example(
        messages=TURNS[1:3] + [{"role": "user", "content": "blue lamp"}, {"role": "assistant", "content": "red"}]
    )
    ids, labels, _ = _one(enc, ex)
    whole = tok(enc.render(ex.messages).rstrip(), add_special_tokens=False).input_ids
    assert ids == whole and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # on its own "red" would start with the tokenizer's start mark; after "<|assistant|>\n" it does not
    answers = tok.convert_ids_to_tokens([t for t in labels if t != IGNORE])
    assert "".join(answers) == "ok</s>red</s>" and tok.tokenize("red")[0].startswith("▁")
    # without BOS in the template, the tokenizer's own BOS is added, once
    enc = Encoder(tok, template.replace("{{ bos_token }}", ""))
    ids, _, _ = _one(enc, ex)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert enc.prompt_ids(ex)[:1] == [tok.bos_token_id]


# --- padding with the end token's id never hides the end token -------------------------------------------------


def test_pad_equal_to_eos_keeps_the_eos_target():
    import numpy as np

    from loratune.data.batching import collate_padded

    eos = 7
    short = (np.array([3, 4, eos]), np.array([IGNORE, 4, eos]))
    long = (np.array([3, 4, 5, 6, eos]), np.array([IGNORE, IGNORE, 5, 6, eos]))
    batch = collate_padded([short[0], long[0]], [short[1], long[1]], pad_id=eos)
    assert batch.input_ids[0].tolist() == [3, 4, eos, eos, eos]
    assert batch.targets[0].tolist() == [4, eos, IGNORE, IGNORE, IGNORE]  # the real end token is still a target
    assert batch.targets[1].tolist() == [IGNORE, 5, 6, eos, IGNORE]
    assert batch.n_targets == 5


# --- refusals that help -----------------------------------------------------------------------------------------


def test_a_refusal_names_the_row_the_turn_what_the_template_said_and_a_fix_this_tokenizer_has(tmp_path):
    from conftest import write_jsonl

    from loratune import TrainConfig
    from loratune.core.errors import UserError
    from loratune.data.prepare import prepare

    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tok = _sentencepiece_style_tokenizer(template)  # has no ChatML tokens, so chatml is not offered as a fix
    rows = [{"messages": TURNS[1:3]}, {"messages": TURNS}]
    cfg = TrainConfig(model="unused", train_data=write_jsonl(tmp_path / "train.jsonl", rows), val_ratio=0)
    with pytest.raises(UserError) as refused:
        prepare(cfg, Encoder(tok, template))
    assert str(refused.value) == (
        f"{tmp_path / 'train.jsonl'} line 2: turn 2 (an answer; turns count from 0): the chat template refused the "
        "conversation up to here: System role not supported. Change the row to a conversation the template accepts, "
        "or set chat_template to a .jinja file that renders it or to a built-in this tokenizer has the tokens for "
        "(plain, alpaca)"
    )

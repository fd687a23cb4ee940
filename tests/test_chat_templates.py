"""Chat templates of popular model families x ordinary conversation shapes, against an independent reference.

The templates (tests/chat_templates, README there) are loratune's own, written to render the same strings as each
family's published template for these shapes, with {% generation %} marks around each answer and its end-of-turn
token; loratune is given them without the marks. The built-in model's template is its own, read from its GGUF. The
tokenizer is the tiny built-in one with each family's special tokens added.

The reference, for every answer of a conversation (what loratune promises, docs/data.md):
- the prompt is the template's generation-time render of the conversation before the answer
  (add_generation_prompt=True), tokenized as generation tokenizes it;
- the targets are the tokens of the span that the template marks with {% generation %}: the answer and its
  end-of-turn token, found by transformers (render_jinja_template, the renderer behind apply_chat_template's
  return_assistant_tokens_mask) in the render of the conversation that ends on that answer; prompt and span are
  then tokenized in one pass with offsets.
This is independent of loratune's way (comparing renders with and without each turn): no string is diffed here.

Where the render that ends on the answer does not start with the generation-time prompt (Qwen3 renders earlier
answers without their think block, Mistral moves the system text into the last user turn, Gemma 4's generation
prompt holds an empty thought channel), the reference still pairs the generation-time prompt with the marked span:
that is the text generation is given, and what the model must produce after it. Where a token of the one-pass
tokenization would straddle prompt and answer, generation could not produce it after the prompt's own tokens, so
the answer is tokenized on its own. The answers of a conversation share one training sequence while each one's
prompt tokens continue the sequence so far, as few sequences as possible.

Where the template itself refuses a conversation (Gemma has no system role; Gemma and Mistral need alternating
roles), loratune must refuse it too and pass the template's own message on.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from loratune.data.encode import IGNORE, Encoder
from loratune.data.formats import Example, RowError

HERE = Path(__file__).parent / "chat_templates"
# A mark with its whitespace control: the marks are written {%- generation -%} and {%- endgeneration -%}, so taking
# out a mark with the whitespace around it renders as the marked template does.
MARK = re.compile(r"\s*\{%-\s*(?:end)?generation\s*-%\}\s*")


@dataclass(frozen=True)
class Family:
    name: str  # the marked template is chat_templates/NAME.jinja
    end: str  # the end-of-turn token the model must learn to emit
    eos: str
    special: tuple[str, ...]
    bos: str | None = None
    plain: tuple[str, ...] = ()  # tokens the family adds that are not special (Qwen3's think tags)
    builtin: bool = False  # the template given to loratune is the built-in model's own, from its GGUF

    @property
    def marked(self) -> str:
        """The template with {% generation %} around each answer and its end-of-turn token."""
        return (HERE / f"{self.name}.jinja").read_text()

    @property
    def template(self) -> str:
        """The template loratune is given: the built-in model's own, or the marked one without its marks."""
        return _builtin_template() if self.builtin else MARK.sub("", self.marked)


@cache
def _builtin_template() -> str:
    """The built-in model's chat template, from its GGUF, through the tokenizer loratune builds from it."""
    from transformers import AutoTokenizer

    from loratune.modeling.model import _builtin_gguf

    gguf = _builtin_gguf("smollm2-135m")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).chat_template


CHATML = ("<|im_start|>", "<|im_end|>")
PHI = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
GEMMA = ("<start_of_turn>", "<end_of_turn>")
LLAMA = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
MISTRAL = ("[INST]", "[/INST]")
FAMILIES = [
    Family("chatml", "<|im_end|>", "<|im_end|>", CHATML),
    Family("smollm2", "<|im_end|>", "<|im_end|>", CHATML, builtin=True),
    Family("qwen2_5", "<|im_end|>", "<|endoftext|>", CHATML),
    Family("qwen3", "<|im_end|>", "<|im_end|>", CHATML, plain=("<think>", "</think>")),
    Family("phi3", "<|end|>", "<|endoftext|>", PHI),
    Family("phi3_5", "<|end|>", "<|endoftext|>", PHI),
    Family("phi4", "<|im_end|>", "<|endoftext|>", ("<|im_start|>", "<|im_sep|>", "<|im_end|>")),
    Family("phi4_mini", "<|end|>", "<|endoftext|>", PHI),
    Family("gemma2", "<end_of_turn>", "<eos>", GEMMA, bos="<bos>"),
    Family("gemma3", "<end_of_turn>", "<eos>", GEMMA, bos="<bos>"),
    Family("gemma4", "<turn|>", "<eos>", ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"), bos="<bos>"),
    Family("llama3", "<|eot_id|>", "<|end_of_text|>", LLAMA, bos="<|begin_of_text|>"),
    Family("llama3_1", "<|eot_id|>", "<|end_of_text|>", LLAMA, bos="<|begin_of_text|>"),
    Family("mistral_v03", "</s>", "</s>", MISTRAL, bos="<s>"),
    Family("mistral_nemo", "</s>", "</s>", MISTRAL, bos="<s>"),
    Family("mistral_small", "</s>", "</s>", (*MISTRAL, "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"), bos="<s>"),
]


def _u(text):
    return {"role": "user", "content": text}


def _a(text, **extra):
    return {"role": "assistant", "content": text, **extra}


SYSTEM = {"role": "system", "content": "You are terse."}
SHAPES = {
    "one_turn": lambda end: [_u("What is the capital of France?"), _a("Paris.")],
    "three_turns": lambda end: [_u("Hi"), _a("Hello!"), _u("2+2?"), _a("4"), _u("And 3+3?"), _a("6")],
    "system": lambda end: [SYSTEM, _u("Name a colour."), _a("Blue.")],
    "system_turns": lambda end: [
        SYSTEM,
        _u("Hi"),
        _a("Hello."),
        _u("Name a colour."),
        _a("Red."),
        _u("Another?"),
        _a("Green."),
    ],
    "end_marker_in_answer": lambda end: [
        _u("How do turns end?"),
        _a(f"With {end}, like this."),
        _u("Sure?"),
        _a(f"Yes: {end}"),
    ],
    "unicode": lambda end: [_u("Übersetze: 猫 🐈"), _a("Katze — 猫 means cat 🐈.")],
    "edge_whitespace": lambda end: [
        _u("  padded question \n"),
        _a("\n  padded answer  \n"),
        _u("\tagain "),
        _a("  again  "),
    ],
    "space_only_answer": lambda end: [_u("Say nothing."), _a(" ")],
    "leading_assistant": lambda end: [_a("Welcome! Ask me anything."), _u("What is 2+2?"), _a("4.")],
    "reasoning": lambda end: [
        _u("What is 6 x 7?"),
        _a("42.", reasoning_content="6 x 7 = 42."),
        _u("And 7 x 8?"),
        _a("56.", reasoning_content="7 x 8 = 56."),
    ],
}


@cache
def _base_tokenizer():
    from loratune.modeling.tiny import make_tokenizer

    return make_tokenizer()


@cache
def tokenizer_for(family: Family):
    tok = copy.deepcopy(_base_tokenizer())
    tokens = {"eos_token": family.eos, "additional_special_tokens": list(family.special)}
    tok.add_special_tokens(tokens | ({"bos_token": family.bos} if family.bos else {}))
    tok.add_tokens(list(family.plain))
    return tok


def _answers(messages):
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]


def reference(tok, family: Family, messages) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each answer, as described at the top."""
    out = []
    for i in _answers(messages):
        prompt = tok.apply_chat_template(
            messages[:i], chat_template=family.template, tokenize=False, add_generation_prompt=True
        )
        (rendered,), (spans,) = render_jinja_template(
            [messages[: i + 1]],
            chat_template=family.marked,
            return_assistant_tokens_mask=True,
            **tok.special_tokens_map,
        )
        start, end = spans[-1]  # the span of the conversation's last answer
        answer = rendered[start:end]
        encoded = tok(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
        cut = len(prompt)
        if any(a < cut < b for a, b in encoded.offset_mapping):
            pair = (_ids(tok, prompt), _ids(tok, answer))
        else:
            k = sum(b <= cut for _, b in encoded.offset_mapping)
            pair = (encoded.input_ids[:k], encoded.input_ids[k:])
        if rendered[:start] == prompt and pair[0] == _ids(tok, prompt):  # transformers' own mask agrees
            whole = tok.apply_chat_template(
                messages[: i + 1], chat_template=family.marked, return_dict=True, return_assistant_tokens_mask=True
            )
            n = len(pair[0]) + len(pair[1])
            assert whole["input_ids"][:n] == pair[0] + pair[1] and all(whole["assistant_masks"][len(pair[0]) : n])
        out.append(pair)
    return out


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def expected_sequences(pairs) -> list[tuple[list[int], list[int], int]]:
    """The reference answers packed into as few sequences as their prompts allow."""
    out = []
    for prompt, answer in pairs:
        if out and prompt[: len(out[-1][0])] == out[-1][0]:
            ids, labels, _ = out.pop()
        else:
            ids, labels = [], []
        context = prompt[len(ids) :]
        out.append((ids + context + answer, labels + [IGNORE] * len(context) + answer, len(ids) + len(context)))
    return out


CASES = [(f, s) for f in FAMILIES for s in SHAPES]
FAMILY = {f.name: f for f in FAMILIES}


@pytest.mark.parametrize("family, shape", CASES, ids=[f"{f.name}-{s}" for f, s in CASES])
def test_targets_match_the_reference(family, shape):
    _check(tokenizer_for(family), family, SHAPES[shape](family.end))


SENTENCEPIECE_CASES = [(FAMILY[n], s) for n in ("mistral_v03", "mistral_nemo") for s in SHAPES]


@pytest.mark.parametrize("family, shape", SENTENCEPIECE_CASES, ids=[f"{f.name}-{s}" for f, s in SENTENCEPIECE_CASES])
def test_targets_match_the_reference_with_a_sentencepiece_tokenizer(family, shape):
    """Mistral v0.3's tokenizer marks the start of its input ("▁") and adds BOS itself: its answers open with a
    space that merges into the first word."""
    from test_encode import _sentencepiece_style_tokenizer

    tok = _sentencepiece_style_tokenizer(family.template)
    tok.add_special_tokens({"additional_special_tokens": list(family.special)})
    _check(tok, family, SHAPES[shape](family.end))


def _check(tok, family: Family, messages):
    encoder = Encoder(tok, family.template)
    try:
        pairs = reference(tok, family, messages)
    except TemplateError as refusal:  # the template's own check: loratune passes its message on
        with pytest.raises(RowError, match=r"^turn \d+ \(an answer.*" + re.escape(str(refusal))):
            encoder.encode(Example(messages=messages))
        return
    got = encoder.encode(Example(messages=messages))
    assert [(s.ids, s.labels, s.answer_start) for s in got] == expected_sequences(pairs)
    # every answer ends with the family's end-of-turn token, nothing after it, and generation stops there
    assert all(tok.convert_ids_to_tokens(answer[-1]) == family.end for _, answer in pairs)
    assert tok.convert_tokens_to_ids(family.end) in encoder.end_ids
    # generation is given exactly the last answer's prompt
    assert encoder.prompt_ids(Example(messages=messages)) == pairs[-1][0]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_marked_templates_render_as_the_plain_ones(family):
    """The marks change no render: every shape renders as with the template loratune is given (for the built-in
    model, its own published template)."""
    tok = tokenizer_for(family)
    assert family.marked != family.template
    for make in SHAPES.values():
        messages = make(family.end)
        for upto in range(1, len(messages) + 1):
            for prompt in (False, True):
                renders = []
                for template in (family.template, family.marked):
                    try:
                        renders.append(
                            tok.apply_chat_template(
                                messages[:upto], chat_template=template, tokenize=False, add_generation_prompt=prompt
                            )
                        )
                    except TemplateError as e:
                        renders.append(f"refused: {e}")
                assert renders[0] == renders[1]


# --- what the done-criteria name, end to end ----------------------------------------------------------------------


def _config(path: Path, rows, **settings):
    from conftest import write_jsonl

    from loratune import TrainConfig

    return TrainConfig(model="unused", train_data=write_jsonl(path, rows), max_length=512, **settings)


def _targets(tok, seq) -> str:
    return tok.decode([t for t in seq.labels if t != IGNORE])


def test_qwen3_conversations_with_several_answers_train_and_report_the_cost(tmp_path):
    from loratune.data.inspect import inspect_data, render
    from loratune.data.prepare import prepare

    family, tok = FAMILY["qwen3"], tokenizer_for(FAMILY["qwen3"])
    turns = [_u("6 x 7?"), _a("42", reasoning_content="six sevens"), _u("7 x 8?"), _a("56"), _u("8 x 9?"), _a("72")]
    seqs = Encoder(tok, family.template).encode(Example(messages=turns))
    # one sequence per answer: each answer is trained after the prompt generation gives it (earlier answers
    # without their think block), as the think block the model must write before it
    assert [_targets(tok, s) for s in seqs] == [
        "<think>\nsix sevens\n</think>\n\n42<|im_end|>",
        "<think>\n\n</think>\n\n56<|im_end|>",
        "<think>\n\n</think>\n\n72<|im_end|>",
    ]
    assert tok.decode(seqs[2].ids).count("<think>") == 1  # history answers carry no think block
    rows = [{"messages": turns}] * 3 + [{"messages": turns[:2]}] * 3
    data = prepare(_config(tmp_path / "train.jsonl", rows, val_ratio=0.5), Encoder(tok, family.template))
    report = data.report
    assert (report.rows, report.split_rows, report.split_sequences) == (6, 3, 9)
    targets = [tok.decode([t for t in y if t != IGNORE]) for y in data.train.labels + data.val.labels]
    assert targets.count("<think>\nsix sevens\n</think>\n\n42<|im_end|>") == 6  # reasoning_content, from the file
    lengths = [len(s.ids) for s in seqs]
    assert report.split_extra_tokens == 3 * sum(lengths[:2])
    assert "3 conversations were trained as 9 sequences" in report.split_line()
    assert (False, report.split_line()) in report.lines()  # printed at the start of training
    # a conversation's sequences stay on one side of the validation split
    train_rows, val_rows = set(data.train.origins), set(data.val.origins)
    assert not train_rows & val_rows and len(train_rows) == len(val_rows) == 3
    # and `data inspect` says it too
    cfg = _config(tmp_path / "inspect.jsonl", rows, val_ratio=0)
    assert report.split_line() in render(inspect_data(cfg, Encoder(tok, family.template)), cfg)


def test_mistral_system_text_is_trained_where_generation_puts_it():
    family, tok = FAMILY["mistral_v03"], tokenizer_for(FAMILY["mistral_v03"])
    turns = [SYSTEM, _u("Hi"), _a("Hello."), _u("Name a colour."), _a("Red.")]
    first, second = Encoder(tok, family.template).encode(Example(messages=turns))
    # generation puts the system text into the last user turn: so does each answer's prompt
    assert tok.decode(first.ids[: first.answer_start]) == "<s>[INST] You are terse.\n\nHi[/INST]"
    assert tok.decode(second.ids[: second.answer_start]) == (
        "<s>[INST] Hi[/INST] Hello.</s>[INST] You are terse.\n\nName a colour.[/INST]"
    )
    assert [_targets(tok, s) for s in (first, second)] == [" Hello.</s>", " Red.</s>"]


def _successor_model(tok, chain: list[int]):
    """A tiny Llama wired to answer token chain[k] with chain[k + 1]: its blocks add nothing to the residual stream,
    each chain token embeds as its own unit vector, and the output layer maps that vector to the next token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 64
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token, k] = 1.0
            model.lm_head.weight[following, k] = 10.0
    return model.eval()


@pytest.mark.parametrize("name", ["phi3", "phi3_5", "phi4_mini"])
def test_phi_answers_end_at_end_of_turn_in_training_and_generation(name):
    from loratune.modeling.generate import generate_texts

    family, tok = FAMILY[name], tokenizer_for(FAMILY[name])
    encoder = Encoder(tok, family.template)
    turns = [_u("Hi"), _a("ok")]
    (seq,) = encoder.encode(Example(messages=turns))
    assert _targets(tok, seq) == "ok<|end|>"  # not the template's trailing end-of-text after it
    prompt = encoder.prompt_ids(Example(messages=turns))
    end = tok.convert_tokens_to_ids("<|end|>")
    # a model that answers "ok", ends its turn, then would go on: generation stops at the end of turn
    chain = [prompt[-1], *_ids(tok, "ok"), end, *_ids(tok, "bye"), tok.eos_token_id]
    assert len(set(chain)) == len(chain)
    model = _successor_model(tok, chain)
    assert generate_texts(model, tok, [prompt], encoder.end_ids, max_new_tokens=8) == ["ok"]
    # a run's generate, chat and eval, and the generation config merge writes, stop at the same tokens
    from loratune.inference.run import run_end_ids

    saved = copy.deepcopy(tok)
    saved.chat_template = family.template  # as saved with the adapter
    assert end in run_end_ids(saved, model) == encoder.end_ids | {tok.eos_token_id}

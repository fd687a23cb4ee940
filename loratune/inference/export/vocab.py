"""The run's tokenizer, chat template and end tokens as GGUF metadata.

A base converted from a GGUF file (the built-in model) keeps that file's tokenizer fields, pre-tokenizer name
included. Any other base's tokenizer is written from its tokenizer.json. Byte-level BPE (Llama 3, Qwen, Phi-4):
llama.cpp re-implements each pre-tokenizer by name, so the name is chosen from the pre-tokenizer settings in
tokenizer.json, and a setting not in PRE_TOKENIZERS is refused rather than guessed. SentencePiece-style BPE (Gemma;
spaces as ▁, characters outside the vocabulary as <0xXX> bytes): llama.cpp's `llama` tokenizer, with the merge
order as scores and the space before the text where the tokenizer puts one (SENTENCEPIECE_STYLES).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ...core.errors import UserError
from ...data.encode import Encoder
from ...data.formats import RowError

# GPT-2's pattern, which tokenizers' ByteLevel(use_regex=True) applies itself.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_SPLIT_THEN_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


NFC = {"type": "NFC"}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


# llama.cpp's pre-tokenizer name for each pre-tokenizer setting it reproduces (keys: the steps, in order).
PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    "llama-bpe": [_split(_WORDS + r"\p{N}{1,3}" + _REST), _SPLIT_THEN_BYTES],  # Llama 3
    "qwen2": [_split(_WORDS + r"\p{N}" + _REST), _SPLIT_THEN_BYTES],
}


_SPACES = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
# SentencePiece-style tokenizers as tokenizer.json writes them (normalizer, pre-tokenizer), and whether llama.cpp's
# `llama` tokenizer must put a space before the text (after each special token too, as these do). A Metaspace
# pre-tokenizer is not among them: it puts no second ▁ before text that starts with a space, where llama.cpp does.
SENTENCEPIECE_STYLES = [
    (_SPACES, None, False),  # Gemma
    # Gemma as transformers 5 writes it: the split on spaces finds none, the normalizer having replaced them.
    (_SPACES, {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}, False),
    ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, _SPACES]}, None, True),  # Llama 2
]


def source_gguf(model_path: str) -> Path | None:
    """The GGUF file a base was converted from (the built-in model, or a .gguf given as `model`)."""
    record = Path(model_path) / "loratune-source.json"
    return Path(json.loads(record.read_text())["gguf"]) if record.is_file() else None


def write_tokenizer(writer, tokenizer, model_path: str, vocab_size: int) -> None:
    source = source_gguf(model_path)
    if source is not None and source.is_file():
        _copy_tokenizer(writer, source, tokenizer)
    else:
        _file_tokenizer(writer, tokenizer, model_path, vocab_size)


def _copy_tokenizer(writer, source: Path, tokenizer) -> None:
    """The tokenizer fields of the GGUF the base came from, as they are (end tokens are written from the run)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    ends = ("eos_token_id", "eot_token_id", "eom_token_id")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml.") or key.endswith(ends):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    if tokens != len(tokenizer):
        raise UserError(
            f"{source}: its vocabulary has {tokens} tokens but the run's tokenizer has {len(tokenizer)}; "
            "the run was not trained on this base"
        )


def _file_tokenizer(writer, tokenizer, model_path: str, vocab_size: int) -> None:
    """The tokenizer from its tokenizer.json: byte-level BPE as llama.cpp's `gpt2` model with the pre-tokenizer
    named, or SentencePiece-style BPE (bytes as <0xXX> tokens) as llama.cpp's `llama` model."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = spec.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pieces = model.get("type") == "BPE" and model.get("byte_fallback")
    if pieces:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_space_prefix(spec, model_path))
    # Qwen's NFC normalizer leaves text that is already NFC (nearly all text) unchanged; llama.cpp applies none.
    elif model.get("type") == "BPE" and spec.get("normalizer") in (None, NFC):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer"), model_path))
        writer.add_token_merges(merges)
    else:
        raise UserError(
            f"tokenizer of {model_path}: GGUF export writes BPE tokenizers, byte-level (Llama 3, SmolLM, Qwen, Phi-4) "
            "or SentencePiece-style (Gemma); this one is another kind. Start from a GGUF of this base "
            "(model: FILE.gguf) instead"
        )
    tokens, types = _vocabulary(tokenizer, vocab_size, pieces)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if pieces:
        writer.add_token_scores(_scores(tokens, model.get("merges", [])))
    bos = tokenizer.bos_token_id
    for token, add in ((bos, writer.add_bos_token_id), (tokenizer.unk_token_id, writer.add_unk_token_id),
                       (tokenizer.pad_token_id, writer.add_pad_token_id)):  # fmt: skip
        if token is not None:
            add(token)
    writer.add_add_bos_token(bos is not None and tokenizer("a").input_ids[:1] == [bos])


def _vocabulary(tokenizer, vocab_size: int, pieces: bool) -> tuple[list[str], list]:
    """Every token and its llama.cpp type, with the embedding rows no token uses (a vocabulary padded to a round
    size) as unused tokens. With SentencePiece-style pieces, <0xXX> are the bytes of characters outside it."""
    from gguf import TokenType

    added = tokenizer.added_tokens_decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = []
    for i, token in enumerate(tokens):
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif pieces and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.UNKNOWN if i == tokenizer.unk_token_id else TokenType.NORMAL)
    padding = range(len(tokenizer), max(vocab_size, len(tokenizer)))
    return tokens + [f"[PAD{i}]" for i in padding], types + [TokenType.UNUSED] * len(padding)


def _scores(tokens: list[str], merges: list) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest, where BPE applies
    the earliest merge: a token scores minus the rank of the merge that makes it (0 for one no merge makes)."""
    rank = {}
    for i, merge in enumerate(merges):  # a pair, or "left right" in older files (a piece has ▁ for its spaces)
        rank.setdefault("".join(merge) if not isinstance(merge, str) else merge.replace(" ", "", 1), i)
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def _space_prefix(spec: dict, model_path: str) -> bool:
    """Whether the tokenizer puts a space (▁) before the text, for the SentencePiece styles llama.cpp reproduces."""
    for normalizer, pre, prefix in SENTENCEPIECE_STYLES:
        if spec.get("normalizer") == normalizer and spec.get("pre_tokenizer") == pre:
            return prefix
    raise UserError(
        f"tokenizer of {model_path}: its SentencePiece-style normalizer and pre-tokenizer are not a pair llama.cpp "
        "is known to reproduce (Gemma's are; a Metaspace pre-tokenizer, as transformers builds Llama 2's and Phi-3's, "
        "is not); exporting it would tokenize text differently from training. Start from a GGUF of this base "
        "(model: FILE.gguf) instead"
    )


def _pre_tokenizer_name(pre: dict | None, model_path: str) -> str:
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    for name, expected in PRE_TOKENIZERS.items():
        if len(steps) == len(expected) and all(
            step and all(step.get(k) == v for k, v in want.items()) for step, want in zip(steps, expected)
        ):
            return name
    raise UserError(
        f"tokenizer of {model_path}: its pre-tokenizer is not one llama.cpp is known to reproduce "
        f"({', '.join(PRE_TOKENIZERS)}); exporting it would tokenize text differently from training"
    )


@dataclass(frozen=True)
class EndTokens:
    eos: int
    turn_end: int | None  # the token that closes an assistant turn in the chat template
    ids: tuple[int, ...]  # every token generation stops at
    texts: tuple[str, ...]


def end_tokens(tokenizer, template: str, model_ends: set[int]) -> EndTokens:
    """Where the trained model stops: end of sequence, the template's end of turn, and the base's own end tokens
    (the same set loratune's generate and merge stop at)."""
    ids = tuple(sorted(Encoder(tokenizer, template, end_ids=model_ends).end_ids))
    texts = tuple(tokenizer.convert_ids_to_tokens(list(ids)))
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        after = Encoder(tokenizer, template).render(probe).rsplit("Hello", 1)[-1]
    except RowError:  # a template that refuses the probe has no turn end to find
        after = ""
    turn_end = next((i for i, t in zip(ids, texts) if after.startswith(t)), None)
    return EndTokens(tokenizer.eos_token_id, turn_end, ids, texts)


def write_chat(writer, template: str | None, ends: EndTokens) -> None:
    """The chat template (None: the run trained on plain text) and the end tokens llama.cpp stops at."""
    if template is not None:
        writer.add_chat_template(template)
    writer.add_eos_token_id(ends.eos)
    if ends.turn_end is not None:
        writer.add_eot_token_id(ends.turn_end)

"""The run's tokenizer, chat template and end tokens as GGUF metadata.

A base converted from a GGUF file (the built-in model) keeps that file's tokenizer fields, pre-tokenizer name
included. Any other base's byte-level BPE tokenizer is written from its tokenizer.json; llama.cpp re-implements
each pre-tokenizer by name, so the name is chosen from the pre-tokenizer settings in tokenizer.json, and a setting
not in PRE_TOKENIZERS is refused rather than guessed.
"""

from __future__ import annotations

import json
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


def source_gguf(model_path: str) -> Path | None:
    """The GGUF file a base was converted from (the built-in model, or a .gguf given as `model`)."""
    record = Path(model_path) / "loratune-source.json"
    return Path(json.loads(record.read_text())["gguf"]) if record.is_file() else None


def write_tokenizer(writer, tokenizer, model_path: str, vocab_size: int) -> None:
    source = source_gguf(model_path)
    if source is not None and source.is_file():
        _copy_tokenizer(writer, source, tokenizer)
    else:
        _bpe_tokenizer(writer, tokenizer, model_path, vocab_size)


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


def _bpe_tokenizer(writer, tokenizer, model_path: str, vocab_size: int) -> None:
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = spec.get("model") or {}
    # Qwen's NFC normalizer leaves text that is already NFC (nearly all text) unchanged; llama.cpp applies none.
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") not in (None, NFC):
        raise UserError(
            f"tokenizer of {model_path}: GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM, Qwen); this "
            "one is another kind (e.g. SentencePiece). Start from a GGUF of this base (model: FILE.gguf) instead"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer"), model_path))
    added = tokenizer.added_tokens_decoder
    size = max(vocab_size, len(tokenizer))
    tokens, types = [], []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        tokens.append(token)
        kind = TokenType.NORMAL if i not in added else TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
        types.append(kind)
    for i in range(len(tokenizer), size):  # embedding rows no token uses (a vocabulary padded to a round size)
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    bos = tokenizer.bos_token_id
    for token, add in ((bos, writer.add_bos_token_id), (tokenizer.unk_token_id, writer.add_unk_token_id),
                       (tokenizer.pad_token_id, writer.add_pad_token_id)):  # fmt: skip
        if token is not None:
            add(token)
    writer.add_add_bos_token(bos is not None and tokenizer("a").input_ids[:1] == [bos])


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

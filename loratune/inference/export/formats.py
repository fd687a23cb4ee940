"""The GGUF number formats `export --type` takes. Apart from the writer, which imports torch: the CLI's parser and
its check of --type read them without loading any model library."""

from __future__ import annotations

from ...core.errors import UserError

# --type: the format of the weight matrices. Norms and biases stay in F32, as llama.cpp's converter keeps them.
TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1")
ADAPTER_TYPES = ("f16", "bf16", "q8_0")  # the formats llama.cpp reads LoRA adapters in
K_QUANTS = (
    "K-quants (Q4_K_M, Q5_K_M, ...) need llama.cpp's own quantizer: export --type f16, then run "
    "`llama-quantize FILE-f16.gguf FILE-Q4_K_M.gguf Q4_K_M`"
)


def check_type(kind: str, adapter_only: bool) -> None:
    """A UserError unless `kind` is a format the model (or with `adapter_only`, the adapter) can be written in."""
    allowed = ADAPTER_TYPES if adapter_only else TYPES
    if kind not in allowed:
        what = "an adapter" if adapter_only else "a model"
        hint = f". {K_QUANTS}" if "_k" in kind.lower() else ""
        raise UserError(f"--type {kind}: {what} is exported as one of {', '.join(allowed)}{hint}")

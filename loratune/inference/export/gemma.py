"""Gemma 2 and Gemma 3 (text) as llama.cpp computes them.

llama.cpp builds most of what sets Gemma apart into its `gemma2`/`gemma3` graphs: the embedding scaled by
sqrt(hidden size), GELU (tanh) feed-forward layers, the layers alternating sliding-window and global attention in a
fixed pattern (Gemma 2: every second layer global; Gemma 3: every sixth), Gemma 3's local rotary base of 10000, and
the query scale, 1/sqrt(head size), or 1/sqrt(hidden / heads) for the 27B models (told apart by their layer count).
A config that differs from any of these is refused, since the file would compute something else. The file carries
the window, Gemma 2's soft-capping, and Gemma 3's global rotary base and scaling (arch.py writes those).
"""

from __future__ import annotations

from ...core.errors import UserError
from .rope import rope_parameters

# The layer counts llama.cpp takes for the 27B models, whose query scale is 1/sqrt(hidden / heads).
_LAYERS_27B = {"gemma2": 46, "gemma3_text": 62}
_SWA_PERIOD = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer attends globally, the others in the window
_LOCAL_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _refuse(config, what: str) -> None:
    raise UserError(f"model type {config.model_type!r}: {what}; llama.cpp's {config.model_type.split('_')[0]} "
                    "computes it otherwise, so GGUF export refuses it")  # fmt: skip


def _check_common(config, shape) -> None:
    kind = config.model_type
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        _refuse(config, f"hidden_activation {config.hidden_activation!r} (not gelu_pytorch_tanh)")
    scale_dim = config.hidden_size // shape.heads if shape.layers == _LAYERS_27B[kind] else shape.head_dim
    if config.query_pre_attn_scalar != scale_dim:
        _refuse(config, f"query_pre_attn_scalar {config.query_pre_attn_scalar} with {shape.layers} layers "
                        f"(llama.cpp scales queries by 1/sqrt({scale_dim}))")  # fmt: skip
    period = _SWA_PERIOD[kind]
    expected = ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(shape.layers)]
    if list(getattr(config, "layer_types", None) or expected) != expected:
        _refuse(config, f"layer_types other than every {period}th layer global")
    if not config.sliding_window:
        _refuse(config, "no sliding_window")


def check_gemma2(config, shape) -> None:
    _check_common(config, shape)
    if not shape.tied:
        _refuse(config, "an output layer apart from the embedding")
    if not config.attn_logit_softcapping or not config.final_logit_softcapping:
        _refuse(config, "no attention or final logit soft-capping")


def check_gemma3(config, shape) -> None:
    _check_common(config, shape)
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        _refuse(config, "logit soft-capping")
    if getattr(config, "use_bidirectional_attention", False):
        _refuse(config, "bidirectional attention")
    local = rope_parameters(config, "sliding_attention")
    if {k: local.get(k, "default") for k in _LOCAL_ROPE} != _LOCAL_ROPE:
        _refuse(config, f"local rotary settings {local} (not the default with rope_theta 10000)")


def gemma2_keys(writer, config, shape) -> None:
    writer.add_sliding_window(config.sliding_window)
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def gemma3_keys(writer, config, shape) -> None:
    writer.add_sliding_window(config.sliding_window)

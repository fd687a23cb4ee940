"""Attention for packed rows: each example attends only to itself, at no cost for the others.

A packed row holds many examples back to back. A block-diagonal mask over the whole row would compute (and on
CPU, store for the backward pass) attention between every pair of tokens in the row, almost all of it masked.
Instead we attend within each example: on CUDA with PyTorch's variable-length flash kernel, elsewhere with one
fused SDPA call per example. Both take the example boundaries (`cu_seq_lens_q`) that the collator derives from
the restarting `position_ids`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "loratune_packed"


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Drop-in for transformers' attention functions; shapes in [B, H, T, D], out [B, T, H, D]."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:  # an ordinary (unpacked) call, e.g. generation
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row per forward pass")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    dropout = dropout if module.training else 0.0
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0 and _flash_varlen_ok():
        out = _flash_varlen(query, key, value, cu_seqlens, kwargs.get("max_length_q"), scaling, window)
    else:
        out = _per_example(query, key, value, cu_seqlens.tolist(), scaling, window, dropout)
    return out, None


def _per_example(query, key, value, bounds, scaling, window, dropout):
    spans = list(zip(bounds[:-1], bounds[1:]))
    longest = max(end - start for start, end in spans)
    if query.device.type == "cpu" and dropout == 0.0 and not (window and longest > window) and _CPU_FLASH:
        # PyTorch's CPU flash kernels run bf16 slower than fp32 (they convert block by block; measured 2x in the
        # backward pass on an AVX512-bf16 CPU): a 16-bit model attends in fp32.
        out = _CpuFlashPerExample.apply(*(t.float() for t in (query, key, value)), spans, scaling)
        return out.to(query.dtype)
    gqa = query.shape[1] != key.shape[1]
    outs = [
        _sdpa(*(t[:, :, start:end] for t in (query, key, value)), scaling, window, dropout, gqa) for start, end in spans
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


# The kernels F.scaled_dot_product_attention runs on CPU (causal, no dropout; grouped-query heads supported).
_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


class _CpuFlashPerExample(torch.autograd.Function):
    """Causal attention example by example inside a packed row, on CPU, with one buffer per result.

    Through autograd, slicing the row would give every example's query/key/value gradient a zero-filled copy of
    the whole row, summed afterwards: for n examples, 3n row-sized fills and additions per layer. Here SDPA's own
    CPU kernels run on each example's slice and write into row-sized outputs and gradients (the examples cover
    the row exactly); the saved tensors are the row's, so gradient checkpointing can drop and recompute them.
    """

    @staticmethod
    def forward(ctx, query, key, value, spans, scale):
        batch, heads, rows, dim = query.shape
        out = query.new_empty(batch, rows, heads, dim)  # [B, T, H, D], the layout the output projection reads
        lse = None
        for start, end in spans:
            o, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *(t[:, :, start:end] for t in (query, key, value)), 0.0, True, scale=scale
            )
            lse = lse if lse is not None else logsumexp.new_empty(batch, heads, rows)
            out[:, start:end] = o.transpose(1, 2)
            lse[:, :, start:end] = logsumexp
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        # [B, H, T, D] views of [B, T, H, D] buffers: the projections' backward then gets contiguous gradients.
        grads = [
            grad_out.new_empty(b, t, h, d).transpose(1, 2) for b, h, t, d in (x.shape for x in (query, key, value))
        ]
        for start, end in ctx.spans:
            pieces = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[:, start:end].transpose(1, 2),
                *(t[:, :, start:end] for t in (query, key, value)),
                out[:, start:end].transpose(1, 2),
                lse[:, :, start:end],
                0.0,
                True,
                scale=ctx.scale,
            )
            for grad, piece in zip(grads, pieces):
                grad[:, :, start:end] = piece
        return (*grads, None, None)


def _sdpa(q, k, v, scaling, window, dropout, gqa):
    length = q.shape[2]
    if window and length > window:  # sliding-window models: a banded causal mask for long examples
        idx = torch.arange(length, device=q.device)
        mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa)


def _flash_varlen(query, key, value, cu_seqlens, max_len, scaling, window):
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    out = varlen_attn(
        q,
        k,
        v,
        cu,
        cu,
        max_len,
        max_len,
        scale=scaling,
        window_size=(window - 1 if window else -1, 0),
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out[None]  # [1, T, H, D]


@functools.cache
def _flash_varlen_ok() -> bool:
    """Use the CUDA kernel only if it agrees with the per-example path on a small case (checked once)."""
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 4, 24, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        kv = torch.randn(2, 1, 2, 24, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        cu = torch.tensor([0, 5, 24], device="cuda")
        fast = _flash_varlen(q, kv[0], kv[1], cu, None, None, None)
        slow = _per_example(q, kv[0], kv[1], [0, 5, 24], None, None, 0.0)
        return bool(torch.allclose(fast.float(), slow.float(), atol=2e-2))
    except Exception:  # no kernel for this GPU or build
        return False


AttentionInterface.register(NAME, packed_attention)

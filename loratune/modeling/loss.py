"""The training loss: summed cross-entropy over target tokens only, without materialising full logits.

Only positions whose next token is a target need logits at all (prompts are masked), so the output layer runs
on those hidden states alone, and so does the last layer's MLP: after the last attention nothing mixes positions.
The output layer is frozen under LoRA, so the gradient with respect to the hidden states can be computed chunk by
chunk in the forward pass: peak memory holds one chunk of fp32 logits instead of all of them, and the FLOPs are
the same as the ordinary forward + backward.
"""

from __future__ import annotations

import contextlib

import torch

from ..data.batching import shape_bucket
from ..data.encode import IGNORE

CHUNK_TOKENS = 2048

# Below this share of target positions the last MLP runs on the target rows only; above it the gather and
# scatter would cost more than they save.
ROW_SUBSET_BELOW = 0.9


class _FrozenHeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        """log p(target) per row, fp32; rows whose target is IGNORE (filler rows, see `CausalLMLoss`) give 0 and no
        gradient."""
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            ignored = t == IGNORE
            t = t.clamp(min=0)
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            out[start : start + chunk] = (logits.gather(1, t[:, None]).squeeze(1) - lse).masked_fill_(ignored, 0)
            if grad is not None:
                # d logp_t / d logits = onehot(t) - softmax, computed in the logits' memory
                probs = (logits - lse[:, None]).exp_().neg_()
                probs[torch.arange(len(t), device=t.device), t] += 1.0
                # masked after the product: [chunk, hidden] is far smaller than [chunk, vocabulary]
                grad[start : start + chunk] = (probs.to(weight.dtype) @ weight).masked_fill_(ignored[:, None], 0)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output[:, None].to(grad.dtype), None, None, None


def _frozen_plain(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """fp32 log-probability of each row's target token [N] from hidden states [N, D] (0 where target is IGNORE):
    SFT's loss sums them, preference losses sum them per answer."""
    if _frozen_plain(head):
        return _FrozenHeadLogprobs.apply(hidden, head.weight, targets, CHUNK_TOKENS)
    return logprobs_of_logits(head(hidden), targets)  # a head with LoRA, a bias or trained weights: autograd


def logprobs_of_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    picked = torch.log_softmax(logits.float(), dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return picked.masked_fill(targets == IGNORE, 0)


def target_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies. `hidden` [N, D] are the states at target positions, `targets` [N] (rows
    with target IGNORE count for nothing)."""
    if not _frozen_plain(head):  # a head with LoRA, a bias or trained weights: ordinary autograd
        return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return -token_logprobs(hidden, head, targets).sum()


# Config attributes of models whose logits are not a plain linear map of the hidden states.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
)


def _plain_head(lm) -> bool:
    return all(getattr(lm.config, name, None) in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


class CausalLMLoss(torch.nn.Module):
    """One forward pass of a `Batch` -> summed cross-entropy of its target tokens.

    With `shape_buckets`, the rows computed only at targets (the last MLP, the output layer) are filled up to a
    `shape_bucket` size with non-target rows, whose results are never read: see `shape_bucket` for why.
    Distributed wrappers (DDP) wrap this module, so gradient synchronisation sees the whole computation.
    """

    def __init__(self, peft_model, shape_buckets: bool = False):
        super().__init__()
        self.model = peft_model
        self.shape_buckets = shape_buckets
        lm = peft_model.get_base_model()
        self.plain_head = _plain_head(lm)
        # The model's own last layer and MLP, held in a tuple, outside the module tree: registered here as well,
        # their weights would be reachable by two paths, and FSDP2 would take them for another unit's.
        self._last = _last_dense_mlp(lm)

    @property
    def last_layer(self) -> torch.nn.Module | None:
        return self._last[0]

    @property
    def last_mlp(self) -> torch.nn.Module | None:
        return self._last[1]

    @last_mlp.setter
    def last_mlp(self, mlp: torch.nn.Module | None) -> None:
        self._last = (self._last[0], mlp)

    def forward(self, batch) -> torch.Tensor:
        lm = self.model.get_base_model()
        packed = {}
        if batch.cu_seqlens is not None:
            # Example boundaries for the packed attention; the all-ones mask tells transformers not to build one.
            packed = dict(
                cu_seq_lens_q=batch.cu_seqlens,
                cu_seq_lens_k=batch.cu_seqlens,
                max_length_q=batch.max_seqlen,
                max_length_k=batch.max_seqlen,
            )
        mask = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(batch.input_ids)
        where = batch.targets.flatten() != IGNORE
        rows = where.nonzero().squeeze(1)
        if self.shape_buckets:
            rows = _fill_rows(rows, where)
        inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, **packed)
        # A checkpointed layer is run again in the backward pass, without the hooks: the subset is for plain runs.
        subset = (
            self.last_mlp is not None
            and not getattr(self.last_layer, "gradient_checkpointing", False)
            and len(rows) < ROW_SUBSET_BELOW * where.numel()
        )
        with _rows_only(self.last_mlp, rows) if subset else contextlib.nullcontext():
            if not self.plain_head:
                logits = lm(**inputs).logits.flatten(0, 1)[rows]
                return torch.nn.functional.cross_entropy(logits.float(), batch.targets.flatten()[rows], reduction="sum")
            hidden = lm.get_decoder()(**inputs).last_hidden_state
        return target_cross_entropy(
            hidden.flatten(0, 1)[rows], lm.get_output_embeddings(), batch.targets.flatten()[rows]
        )


def _fill_rows(rows: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The target rows and as many other rows as bring their count to its `shape_bucket` (if the pass has them).
    Coarse buckets: only the last MLP and the output layer run on these rows, so filler costs little."""
    extra = shape_bucket(len(rows), per_octave=4) - len(rows)
    others = (~where).nonzero().squeeze(1)[:extra]
    return torch.cat([rows, others]) if extra and len(others) == extra else rows


def _last_dense_mlp(lm) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """The last decoder layer and its feed-forward block when that is a dense, position-wise MLP (not a mixture
    of experts, whose routing may depend on the other tokens)."""
    layers = getattr(lm.get_decoder(), "layers", None)
    mlp = getattr(layers[-1], "mlp", None) if layers else None
    return (layers[-1], mlp) if type(mlp).__name__.endswith("MLP") else (None, None)


@contextlib.contextmanager
def _rows_only(mlp: torch.nn.Module, rows: torch.Tensor):
    """Runs `mlp` on the given rows of its [..., D] input; the other rows of its output are zeros. Exact for the
    loss when `rows` are the target positions of the last layer: no other position of its output is read."""
    shape = {}

    def select(module, args):
        (x,) = args
        shape["x"] = x.shape
        return (x.reshape(-1, x.shape[-1]).index_select(0, rows),)

    def scatter(module, args, out):
        full = out.new_zeros(shape["x"][:-1].numel(), out.shape[-1]).index_copy(0, rows, out)
        return full.view(*shape["x"][:-1], out.shape[-1])

    handles = [mlp.register_forward_pre_hook(select), mlp.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

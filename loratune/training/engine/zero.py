"""DeepSpeed ZeRO-2 and ZeRO-3, as an accelerate config asks for them: the DeepSpeed engine set up for loratune's
steps, and its partitioned state read and written as whole tensors.

A loratune step takes a varying number of forward passes, and its loss is already divided by the step's target
tokens. So DeepSpeed accumulates over one step only (gradient_accumulation_steps 1: it leaves the loss unscaled),
the passes before the last are marked as not ending the step (its gradient accumulation boundary), and one
DeepSpeed step follows the last pass: it clips to max_grad_norm, as loratune does, skips an update whose gradient
norm is not finite, and updates AdamW; loratune's schedule sets AdamW's learning rate, as with the other engines.

Checkpoints hold the adapter and AdamW's state whole and keyed by parameter name, as torch.distributed.checkpoint
writes them for the other engines: a ZeRO run resumes on any number of processes or on another engine, and the
others' checkpoints resume under ZeRO. DeepSpeed creates AdamW's state at the first update; a resumed run creates it
first, then writes each process's part of every tensor.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from ...memory.arithmetic import ZERO3_SHARDS
from .ddp import DDP


class ZeRO(DDP):
    """ZeRO-2 (optimizer state and gradients split) or ZeRO-3 (the weights too), run by DeepSpeed's engine."""

    def __init__(self, accelerator, processes: int, nodes: int, backend: str | None, stage: int):
        super().__init__(accelerator, processes, nodes, backend)
        self.kind, self.sharded = f"ZeRO-{stage}", stage == 3
        self.sharding = ZERO3_SHARDS if self.sharded else None

    @property
    def may_replay_smaller(self) -> bool:
        return False  # DeepSpeed's engine was set up for the micro-batch it was given

    @property
    def may_cut_steps(self) -> bool:
        return False  # the step's gradients so far are split over DeepSpeed's buffers

    def check(self, cfg, dtype: torch.dtype) -> None:
        from .fsdp import refuse_4bit
        from .launch import LaunchRefused

        refuse_4bit(self, cfg)
        if dtype == torch.float16:  # accelerate would turn on DeepSpeed's fp16, which casts LoRA too
            raise LaunchRefused(
                f"precision fp16: {self.kind} would train the LoRA weights in fp16 too; use bf16 or fp32"
            )

    def prepare(self, module, optimizer, micro_batch: int, cfg):
        """DeepSpeed's engine runs the passes; `optimizer` stays loratune's AdamW inside it (the schedule sets its
        learning rate)."""
        # DeepSpeed calls torch's collectives by their older names, which warn at every call
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch
        config["gradient_accumulation_steps"] = 1  # loratune accumulates: DeepSpeed must not divide the loss again
        config["train_batch_size"] = micro_batch * self.processes
        config["gradient_clipping"] = cfg.max_grad_norm  # 0: none
        if self.sharded:
            import deepspeed

            # Split the weights now, one at a time as they move to the device: DeepSpeed's engine would first move
            # the whole model there. (The base was loaded whole into host memory, as for FSDP2.)
            deepspeed.zero.Init(module=module, dtype=torch.float32, mem_efficient_linear=False)
            # The loss reads the output layer's weight outside the layer's forward pass (see modeling.loss):
            # gathered for the whole forward and backward pass of the loss module.
            head = module.model.get_base_model().get_output_embeddings()
            deepspeed.zero.register_external_parameter(module, head.weight)
        return self.accelerator.prepare(module, optimizer)

    def held_here(self, model) -> str | None:
        from .fsdp import held_text

        return held_text(self.kind, model) if self.sharded else None

    def unwrap(self, module):
        return module if self.sharded else module.module

    def backward(self, module, loss: torch.Tensor) -> None:
        module.backward(loss)

    @contextlib.contextmanager
    def no_sync(self, module):
        """ZeRO reduces every pass's gradients to the processes that hold their slices: such a pass only does not
        end the step."""
        module.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            module.set_gradient_accumulation_boundary(True)

    def update(self, module, optimizer, trainable, cfg, loss: float) -> tuple[float, bool]:
        """DeepSpeed's step: the same clipping; it skips an update whose gradient norm is not finite."""
        module.step()
        grad_norm = float(module.get_global_grad_norm())
        return grad_norm, math.isfinite(loss) and math.isfinite(grad_norm)

    def adapter_state(self, model) -> dict[str, torch.Tensor]:
        return _whole_trainable(model) if self.sharded else super().adapter_state(model)

    def load_adapter_state(self, model, state: dict[str, torch.Tensor]) -> None:
        _load_weights(dict(model.named_parameters()), state)

    def optimizer_state(self, module, optimizer) -> dict:
        return _optimizer_state(module)

    def load_optimizer_state(self, module, optimizer, saved: dict) -> None:
        _load_optimizer_state(module, saved)


def _whole_trainable(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on every process (all processes call it: each gives its slices)."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained parameters in the optimizer's order, named as the unwrapped module's (as torch's state dicts
    name them)."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _adamw(engine) -> torch.optim.AdamW:
    return engine.optimizer.optimizer  # the ZeRO optimizer steps loratune's AdamW on its flat slices


def _optimizer_state(engine) -> dict:
    """AdamW's state, whole tensors per parameter name, as torch.distributed.checkpoint's full state dict."""
    from deepspeed.utils import safe_get_full_optimizer_state

    adamw, named = _adamw(engine), _trainable(engine)
    state = {}
    if adamw.state:  # none until the first update (every earlier step skipped as non-finite)
        step = next(iter(adamw.state.values()))["step"]  # every slice is updated at every step
        for name, p in named:  # a collective per tensor: all processes, in the same order
            moments = {k: safe_get_full_optimizer_state(p, k).cpu() for k in ("exp_avg", "exp_avg_sq")}
            state[name] = {"step": step.detach().cpu().clone(), **moments}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in adamw.param_groups]
    groups[0]["params"] = [name for name, _ in named]  # loratune's AdamW has one group
    return {"state": state, "param_groups": groups}


def _load_weights(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    """Set trained weights (whole, by name) in the model and in ZeRO's fp32 copy that AdamW updates."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for name, value in weights.items():
        p = params[name]
        value = value.to(p.device, torch.float32)
        if hasattr(p, "ds_id"):  # ZeRO-3: this process's slice, in both copies
            local = _slice(p, value)
            p.ds_tensor.data.copy_(local)
            safe_set_local_fp32_param(p, local)
        else:  # ZeRO-2: whole weights on every process; the fp32 copy is split
            p.data.copy_(value)
            safe_set_full_fp32_param(p, value)


def _load_optimizer_state(engine, saved: dict) -> None:
    """Restore AdamW's state from a whole state dict (any engine's, any number of processes)."""
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    adamw, zero = _adamw(engine), engine.optimizer
    for group, hyper in zip(adamw.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    named = _trainable(engine)
    if not saved["state"]:  # saved before the first update
        return
    step = saved["state"][named[0][0]]["step"]
    # AdamW's state of each flat slice that ZeRO steps, created as AdamW creates it at its first step
    on_device = adamw.param_groups[0].get("fused") or adamw.param_groups[0].get("capturable")
    for flat in getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups:
        adamw.state[flat] = {
            "step": step.to(flat.device if on_device else "cpu", torch.float32).clone(),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-2 links each weight to its slices of it
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        for key in ("exp_avg", "exp_avg_sq"):
            value = saved["state"][name][key].to(p.device, torch.float32)
            if hasattr(p, "ds_id"):
                safe_set_local_optimizer_state(p, _slice(p, value), key)
            else:
                safe_set_full_optimizer_state(p, value, key)


def _slice(p, value: torch.Tensor) -> torch.Tensor:
    """This process's slice of a ZeRO-3 parameter's whole `value`: the slices are equal, the last one padded."""
    import deepspeed.comm as dist

    size, group = p.ds_tensor.numel(), p.ds_process_group
    flat = torch.nn.functional.pad(value.flatten(), (0, size * dist.get_world_size(group=group) - value.numel()))
    return flat.narrow(0, size * dist.get_rank(group=group), size)

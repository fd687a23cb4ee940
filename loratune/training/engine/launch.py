"""Which processes train, and which engine: one process, or several started by a launcher (`--num-processes`, torchrun,
`accelerate launch`, MPI, Slurm), data-parallel (DDP), with the weights sharded (FSDP2), or DeepSpeed's ZeRO-2
(optimizer state and gradients split) or ZeRO-3 (the weights too).

N processes that each believe they are alone train on N times the data and write the same run folder N times, and
the result looks fine. So the processes the launcher started are compared with those that joined the job, and a
launch that does not add up stops before any weight is loaded. The engine comes from what the launcher asked for
(an accelerate config file sets ACCELERATE_USE_FSDP or ACCELERATE_USE_DEEPSPEED), never silently another one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...core.errors import UserError
from .base import Engine
from .ddp import DDP
from .fsdp import FSDP2
from .zero import ZeRO

# (processes, this process's rank) as launchers set them: torchrun and accelerate launch, MPI, then Slurm's srun.
LAUNCHER_VARIABLES = (
    ("WORLD_SIZE", "RANK"),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("PMI_SIZE", "PMI_RANK"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),
    ("SLURM_NTASKS", "SLURM_PROCID"),
)
README = "README.md, 'Several GPUs'"


class LaunchRefused(UserError):
    """A launch that cannot train as one job: processes that did not all join it, or an engine loratune does not
    run. Every process raises it, before any weight is loaded; the launcher's rank 0 reports it, so the user reads
    one line."""


@dataclass(frozen=True)
class Launch:
    processes: int
    rank: int
    variable: str  # the environment variable that gave the number ("" for a plain single process)


def launched() -> Launch:
    """The processes the launcher started, as its environment says."""
    for size, rank in LAUNCHER_VARIABLES:
        if size in os.environ:
            return Launch(int(os.environ[size]), int(os.environ.get(rank, 0)), size)
    return Launch(1, 0, "")


def start(device: torch.device, mixed_precision: str):
    """This process's engine, its accelerator's process group joined; refuses a launch whose processes did not all
    join, and an engine that cannot run here."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    sharding, reshard = _requested_sharding()  # before accelerate acts on the request
    # On a machine without a GPU accelerate joins the processes only when told the device is the CPU; with the
    # default device (`auto`) each process trained alone. DeepSpeed, though, it sets up only when not told so, and
    # then counts the processes only when told the CPU's backend.
    zero, cpu = (sharding or "").startswith("ZeRO"), device.type == "cpu"
    gloo = [InitProcessGroupKwargs(backend="gloo")] if zero and cpu else []
    accelerator = Accelerator(cpu=cpu and not zero, mixed_precision=mixed_precision, kwargs_handlers=gloo)
    if sharding == "ZeRO-3":
        from transformers.integrations import unset_hf_deepspeed_config

        # accelerate told transformers about ZeRO-3, which would then build every model (even the planner's, on
        # the meta device) split over the processes; loratune splits the model itself once it is built
        # (training.zero), so a ZeRO-3 model loads as any other.
        unset_hf_deepspeed_config()
    check_launch(accelerator.num_processes, accelerator.distributed_type)
    return engine_of(accelerator, sharding, reshard)


def check_launch(joined: int, distributed_type) -> None:
    launch = launched()
    if launch.processes == joined:
        return
    if launch.variable == "SLURM_NTASKS":
        how = (
            "srun started the tasks without a launcher: run one `torchrun` (or `accelerate launch`) per node under "
            f"srun ({README})"
        )
    else:
        how = f"check the launch command against {README}"
    raise LaunchRefused(
        f"{launch.variable}={launch.processes}: the launcher started {launch.processes} processes, but this one "
        f"joined a job of {joined} ({distributed_type.value}), so each would train alone on all the data; "
        f"stopped before loading any weights. {how}"
    )


def engine_of(accelerator, kind: str | None, reshard: bool) -> Engine:
    """The engine: `kind` when the launch asked for sharding (FSDP2), else as accelerate set it up."""
    from accelerate.utils import DistributedType

    distributed = accelerator.distributed_type
    if kind == "FSDP2" and not torch.distributed.is_initialized():  # one process without a launcher: no shards
        kind = None
    if kind is None:
        if distributed == DistributedType.NO:
            kind = "single process"
        elif distributed.value.startswith("MULTI_"):
            kind = "DDP"
        else:
            raise LaunchRefused(
                f"accelerate set up {distributed.value}, which loratune does not run; use DDP, FSDP2 or DeepSpeed ZeRO"
            )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    initialized = torch.distributed.is_initialized()  # by DeepSpeed, whose backend accelerate does not record
    shape = (
        accelerator.num_processes,
        max(1, accelerator.num_processes // max(1, local)),
        torch.distributed.get_backend() if initialized else accelerator.state.backend,
    )
    if kind == "single process":
        return Engine(accelerator)
    if kind == "DDP":
        return DDP(accelerator, *shape)
    if kind == "FSDP2":
        return FSDP2(accelerator, *shape, reshard)
    return ZeRO(accelerator, *shape, stage=int(kind[-1]))


def _requested_sharding() -> tuple[str | None, bool]:
    """FSDP2 when the accelerate config (or environment) asks for FSDP, with its reshard setting, ZeRO-2 or ZeRO-3
    when it asks for DeepSpeed; refuses what loratune does not run rather than fall back to another engine."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return _requested_zero(), True
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None, True
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise LaunchRefused(
            f"the accelerate config asks for FSDP version {plugin.fsdp_version}; loratune runs FSDP2: set "
            "fsdp_version: 2 under fsdp_config"
        )
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise LaunchRefused("fsdp_offload_params: loratune does not offload FSDP2 weights yet; set it to false")
    if plugin.activation_checkpointing:
        raise LaunchRefused(
            "fsdp_activation_checkpointing: set it to false and use loratune's gradient_checkpointing: true instead"
        )
    return "FSDP2", bool(plugin.reshard_after_forward)


def _requested_zero() -> str:
    """ZeRO-2 or ZeRO-3, as the accelerate config's DeepSpeed settings (or its DeepSpeed config file) ask; what
    would change loratune's steps is refused."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise LaunchRefused(
            "the accelerate config asks for DeepSpeed, which is not installed: pip install 'loratune[deepspeed]'"
        )
    from accelerate.utils import DeepSpeedPlugin

    try:
        config = DeepSpeedPlugin().deepspeed_config
    except (ValueError, OSError) as e:  # a DeepSpeed config file that accelerate cannot read, or that contradicts it
        raise LaunchRefused(f"the accelerate config's DeepSpeed settings: {str(e).splitlines()[0]}") from None
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise LaunchRefused(f"DeepSpeed zero_stage {stage}: loratune runs ZeRO stage 2 or 3; set zero_stage: 2 or 3")
    for part in ("offload_optimizer", "offload_param"):
        if config["zero_optimization"].get(part, {}).get("device", "none") not in ("none", None):
            raise LaunchRefused(f"DeepSpeed {part}: loratune does not offload to the CPU or NVMe yet; set it to none")
    for key, what in (
        ("optimizer", "an optimizer: loratune uses its own AdamW"),
        ("scheduler", "a scheduler: loratune uses its own learning-rate schedule"),
    ):
        if key in config:
            raise LaunchRefused(f"the DeepSpeed config sets {what}; remove its {key} section")
    for precision in ("fp16", "bf16"):
        if str(config.get(precision, {}).get("enabled", "auto")).lower() == "true":
            raise LaunchRefused(
                f"the DeepSpeed config enables {precision}, which would cast the LoRA weights too; remove it and set "
                f"loratune's precision: {precision} (the base in {precision}, LoRA in fp32)"
            )
    if config.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise LaunchRefused(
            "the DeepSpeed config sets gradient_accumulation_steps: set loratune's gradient_accumulation_steps "
            "instead (loratune accumulates the passes of each step itself)"
        )
    return f"ZeRO-{stage}"

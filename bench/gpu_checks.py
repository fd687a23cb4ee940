"""The CUDA-only paths of loratune, each as a check that says ok or failed (with the error), run in its own process.

    python -m bench.gpu_checks NAME CONTEXT.json RESULT.json

CONTEXT.json (written by `bench.gpu`): {"device", "work", "models": {shape: model folder}, "check_model": the
folder the training checks use}. A check returns its
numbers and a one-line detail, raises Skip when it cannot run here, and fails by raising anything else. Its own
process isolates it: a CUDA error, a per-process memory cap or a hung kernel ends with the process, and
`bench.gpu` kills it when its time is up.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import traceback
from pathlib import Path

import torch

from .workload import make_workload

SEED = 42


class Skip(Exception):
    """The check cannot run here (the reason is the message)."""


# --- Running a check -------------------------------------------------------------------------------------------


def skip_reason(name: str, device: str) -> str | None:
    """Why check `name` does not run on `device` with the packages installed here; None when it runs."""
    cuda_only, package = CHECKS[name][1:]
    if cuda_only and device != "cuda":
        return f"CUDA only: {cuda_only}"
    if package and importlib.util.find_spec(package) is None:
        return f"{package} is not installed (carry its wheel, bench/README.md)"
    return None


def main() -> None:
    name, context, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    try:
        result = {"status": "ok"} | CHECKS[name][0](context)
    except Skip as e:
        result = {"status": "skipped", "detail": str(e)}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "failed", "detail": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    out.write_text(json.dumps(result))


# --- Shared set-up ---------------------------------------------------------------------------------------------


def _data(context: dict, model: str, examples: int) -> str:
    """A JSONL file of `examples` workload rows (the speed benchmark's kind) for `model`'s tokenizer."""
    from loratune.modeling.model import load_tokenizer

    path = Path(context["work"]) / f"data-{Path(model).name}-{examples}.jsonl"
    if not path.exists():
        make_workload(load_tokenizer(model), examples, SEED).write_jsonl(path)
    return str(path)


def _config(context: dict, name: str, steps: int, **settings):
    """A short run of the checks' model: the 0.5B shape on a GPU (passes big enough for a real out-of-memory error
    above the CUDA context)."""
    from loratune import TrainConfig

    model = context["check_model"]
    fields = dict(
        model=model,
        train_data=_data(context, model, steps * 16),
        val_ratio=0,
        epochs=1,
        batch_size=8,
        gradient_accumulation_steps=2,
        lora_dropout=0.0,  # dropout masks depend on how a step is split into passes, and on compilation
        max_length=1024,
        learning_rate=1e-3,
        seed=SEED,
        device=context["device"],
        early_stopping_patience=0,
        output_dir=str(Path(context["work"]) / name),
    )
    return TrainConfig(**(fields | settings))


def _train(cfg) -> tuple[dict, list[dict]]:
    """Train; the summary and metrics.jsonl's events."""
    from loratune import train

    summary = train(cfg, overwrite=True)
    events = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return summary, events


def _reference(context: dict, name: str, steps: int, **settings) -> tuple[dict, list[dict]]:
    """An uncapped, uncompiled run that other checks compare with, trained once and shared through the work folder
    (each check runs in its own process)."""
    cfg = _config(context, name, steps, **settings)
    done = Path(cfg.output_dir) / "summary.json"
    if not done.exists():
        _train(cfg)
    events = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return json.loads(done.read_text()), events


def _adapter_difference(run: str, reference: str) -> float:
    """Relative difference of two runs' adapters: |a - b| / |b| over all adapter weights."""
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(r) / "adapter" / "adapter_model.safetensors")) for r in (run, reference))
    if a.keys() != b.keys():
        raise AssertionError("the adapters hold different weights")
    diff = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b) ** 0.5
    return diff / max(1e-30, sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5)


def _losses(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "train"]


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# --- The checks ------------------------------------------------------------------------------------------------


def check_flash_varlen(context: dict) -> dict:
    """loratune's self-check of the variable-length flash kernel, then forward and backward of a training-sized
    packed row (Qwen2.5-0.5B's 14 query / 2 key-value heads) against per-example SDPA."""
    from loratune.modeling import attention

    if not attention._flash_varlen_ok():
        attention._flash_varlen_ok.cache_clear()
        q = torch.randn(1, 4, 24, 64, device="cuda", dtype=torch.bfloat16)
        attention._flash_varlen(q, q[:, :2], q[:, :2], torch.tensor([0, 5, 24], device="cuda"), None, None, None)
        raise AssertionError("the kernel runs but disagrees with per-example SDPA: training falls back to SDPA")
    bounds = [0, 5, 300, 1000, 1017, 2048]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, h, bounds[-1], 64, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
        for h in (14, 2, 2)
    )
    cu = torch.tensor(bounds, device="cuda")
    grad_out = torch.randn(1, bounds[-1], 14, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    results = []
    for run in (
        lambda: attention._flash_varlen(q, k, v, cu, None, None, None),
        lambda: attention._per_example(q, k, v, bounds, None, None, 0.0),
    ):
        out = run()
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append([out, *grads])
    errors = {
        name: float((fast.float() - slow.float()).norm() / slow.float().norm())
        for name, fast, slow in zip(("out", "dq", "dk", "dv"), *results)
    }
    worst = max(errors, key=errors.get)
    if errors[worst] > 2e-2:
        raise AssertionError(f"{worst} differs from per-example SDPA by {errors[worst]:.1e} (relative)")
    return {
        "detail": "self-check passed; 5 examples in a 2,048-token row, output and gradients within "
        f"{errors[worst]:.1e} of per-example SDPA (relative)",
        "relative_errors": errors,
    }


def check_fused_adamw(context: dict) -> dict:
    """loratune's optimizer on CUDA is the fused AdamW, and its updates match the unfused one's."""
    from loratune import TrainConfig
    from loratune.training.setup import lr_factor, make_optimizer

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(8, 896), (896, 8), (8, 4864), (4864, 8)]
    mine = [torch.randn(s, device="cuda", generator=gen, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in mine]
    cfg = TrainConfig(learning_rate=2e-4, weight_decay=0.01)
    optimizer, scheduler = make_optimizer(cfg, mine, torch.device("cuda"), total_steps=6, warmup_steps=1)
    if not optimizer.defaults.get("fused"):
        raise AssertionError(f"loratune's AdamW on CUDA is not fused: {optimizer.defaults}")
    reference = torch.optim.AdamW(theirs, lr=2e-4, weight_decay=0.01, foreach=False, fused=False)
    ref_schedule = torch.optim.lr_scheduler.LambdaLR(reference, lr_factor(cfg.lr_scheduler, 1, 6))
    for _ in range(6):
        for a, b in zip(mine, theirs):
            a.grad = torch.randn(a.shape, device="cuda", generator=gen)
            b.grad = a.grad.clone()
        optimizer.step(), reference.step(), scheduler.step(), ref_schedule.step()
    worst = max(float((a - b).abs().max()) for a, b in zip(mine, theirs))
    if worst > 1e-5:  # a few float32 roundings; each update moves the weights by about 2e-4
        raise AssertionError(f"fused and unfused AdamW differ by {worst:.1e} after 6 steps")
    return {"detail": f"fused=True; 6 updates equal to unfused AdamW within {worst:.1e}", "max_difference": worst}


def _cap(cfg) -> tuple[str, int]:
    """A max_memory between the estimated peaks of batch_size 2 and 8: batch_size 8 must run out of memory."""
    from loratune.core.device import choose_dtype, resolve_device
    from loratune.data.encode import encoder_for
    from loratune.data.plan import plan_for
    from loratune.data.prepare import prepare
    from loratune.memory.arithmetic import MemoryModel
    from loratune.memory.planner import Budget, largest_pass, peak_items
    from loratune.memory.shape import read_shape
    from loratune.modeling.model import load_tokenizer

    device = resolve_device(cfg.device)
    data = prepare(cfg, encoder_for(load_tokenizer(cfg.model), cfg)).train
    mm = MemoryModel.for_run(cfg, read_shape(cfg.model, cfg), device, choose_dtype(cfg.precision, device))
    plan = plan_for(cfg, data.lengths, data.target_counts, packing=True)
    plenty = Budget(2**50, "plenty")

    def peak(b: int) -> int:
        return peak_items(mm, largest_pass(mm, plan.with_micro_batch(b)), plenty)[1]

    cap = (peak(2) + peak(8)) // 2
    return str(cap), cap


def check_oom_replay(context: dict) -> dict:
    """`max_memory` below the estimated peak of batch_size 8: on CUDA the allocator is capped, so a pass runs out of
    memory for real (on CPU loratune raises it from the estimate); the step is replayed with half-size passes and
    gives the uncapped run's update."""
    settings = dict(precision="fp32")  # fp32 base: replayed passes then agree with the reference to rounding
    reference, _ = _reference(context, "reference-fp32", 2, **settings)
    cap, cap_bytes = _cap(_config(context, "capped", 2, **settings))
    cfg = _config(context, "capped", 2, max_memory=cap, **settings)
    summary, events = _train(cfg)
    halvings = [e for e in events if e["event"] == "out_of_memory"]
    if not halvings:
        raise AssertionError(f"no out-of-memory error under max_memory {cap_bytes / 2**30:.2f} GiB")
    if len(_losses(events)) != reference["steps"]:
        raise AssertionError(f"{len(_losses(events))} steps logged, the reference run has {reference['steps']}")
    difference = _adapter_difference(cfg.output_dir, str(Path(context["work"]) / "reference-fp32"))
    if difference > 1e-3:
        raise AssertionError(f"the replayed steps' adapter differs from the uncapped run's by {difference:.1e}")
    return {
        "detail": f"max_memory {cap_bytes / 2**30:.2f} GiB: {len(halvings)} out-of-memory error(s), batch_size "
        f"8 -> {summary['batch_size']}; adapter within {difference:.1e} of the uncapped run's (relative)",
        "cap_bytes": cap_bytes,
        "halvings": len(halvings),
        "batch_size": summary["batch_size"],
        "adapter_difference": difference,
    }


def check_batch_auto(context: dict) -> dict:
    """`batch_size: auto` under the same cap: its trial pass on the GPU, first at the estimate's choice (it must
    fit), then forced to start at batch_size 8 (the trial pass must run out of memory and halve). Both runs train
    without an out-of-memory error and give the uncapped run's update."""
    from loratune.memory.planner import BatchChoice
    from loratune.planning import resolved as resolution

    settings = dict(precision="fp32")
    _reference(context, "reference-fp32", 2, **settings)
    cap, cap_bytes = _cap(_config(context, "auto", 2, **settings))
    out = {}
    for run in ("auto", "auto-forced"):
        cfg = _config(context, run, 2, max_memory=cap, batch_size="auto", **settings)
        if run == "auto-forced":  # as if the estimate had been too low: the trial pass must catch it
            chosen = resolution.choose_batch_size

            def too_big(mm, plan, budget, cfg, from_data=True, chosen=chosen):
                choice = chosen(mm, plan, budget, cfg, from_data)
                return BatchChoice(8, plan.with_micro_batch(8).accumulation, choice.peak, choice.largest, "forced")

            resolution.choose_batch_size = too_big
        summary, events = _train(cfg)
        if any(e["event"] == "out_of_memory" for e in events):
            raise AssertionError(f"{run}: training ran out of memory after the trial pass")
        difference = _adapter_difference(cfg.output_dir, str(Path(context["work"]) / "reference-fp32"))
        if difference > 1e-3:
            raise AssertionError(f"{run}: adapter differs from the uncapped run's by {difference:.1e}")
        out[run] = {"batch_size": summary["batch_size"], "adapter_difference": difference}
    if out["auto-forced"]["batch_size"] >= 8:
        raise AssertionError("the forced trial pass at batch_size 8 did not run out of memory under the cap")
    return {
        "detail": f"max_memory {cap_bytes / 2**30:.2f} GiB: auto chose batch_size {out['auto']['batch_size']}; "
        f"forced to 8, the trial pass halved to {out['auto-forced']['batch_size']}; both adapters within "
        f"{max(r['adapter_difference'] for r in out.values()):.1e} of the uncapped run's",
        "runs": out,
    }


def _against_eager(context: dict, flag: str) -> dict:
    """Train 4 steps with `flag` on and compare with the same run in eager PyTorch: losses and step times."""
    eager, eager_events = _reference(context, "reference-bf16", 4)
    summary, events = _train(_config(context, flag, 4, **{flag: True}))
    mine, theirs = _losses(events), _losses(eager_events)
    worst = max(_relative(a, b) for a, b in zip(mine, theirs))
    if len(mine) != len(theirs) or worst > 2e-2:
        raise AssertionError(f"losses {mine} differ from eager {theirs} (worst {worst:.1%})")

    def warm_tokens_per_s(evs):
        steps = [e for e in evs if e["event"] == "train"][1:]
        return sum(e["tokens"] for e in steps) / sum(e["seconds"] for e in steps)

    speed, eager_speed = warm_tokens_per_s(events), warm_tokens_per_s(eager_events)
    first = next(e["seconds"] for e in events if e["event"] == "train")
    return {
        "detail": f"losses within {worst:.2%} of eager; steps 2-4 at {speed:,.0f} tokens/s, eager "
        f"{eager_speed:,.0f} ({speed / eager_speed:.2f}x); first step {first:.1f}s",
        "losses": mine,
        "eager_losses": theirs,
        "tokens_per_s": speed,
        "eager_tokens_per_s": eager_speed,
    }


def check_torch_compile(context: dict) -> dict:
    """`torch_compile: true` (decoder layers compiled, dynamic shapes) trains like eager, in compiled code."""
    result = _against_eager(context, "torch_compile")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if not graphs:
        raise AssertionError("no graph was compiled: the layers ran eagerly")
    return result | {"detail": f"{result['detail']}; {graphs} graphs compiled", "graphs": graphs}


def check_liger_kernels(context: dict) -> dict:
    """`liger_kernels: true` (Liger's RoPE, RMSNorm and SwiGLU kernels) trains like eager."""
    return _against_eager(context, "liger_kernels")


def check_qlora(context: dict) -> dict:
    """`load_in_4bit: true` (QLoRA, bitsandbytes NF4) trains: finite losses, an adapter saved."""
    eager, eager_events = _reference(context, "reference-bf16", 4)
    summary, events = _train(_config(context, "qlora", 2, load_in_4bit=True))
    losses = _losses(events)
    if not losses or not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"losses {losses}")
    first = _relative(losses[0], _losses(eager_events)[0])
    return {
        "detail": f"2 steps, losses {', '.join(f'{x:.3f}' for x in losses)}; step 1 within {first:.1%} of the "
        f"bf16 base's; peak {summary.get('peak_memory_bytes', 0) / 2**30:.2f} GiB",
        "losses": losses,
    }


# name: (function, why it needs CUDA or None, a package it needs or None)
CHECKS = {
    "flash_varlen": (check_flash_varlen, "PyTorch's variable-length flash kernel", None),
    "fused_adamw": (check_fused_adamw, "loratune uses the fused AdamW on CUDA only", None),
    "oom_replay": (check_oom_replay, None, None),
    "batch_auto": (check_batch_auto, "the trial pass of batch_size auto runs on a GPU only", None),
    "liger_kernels": (check_liger_kernels, "Liger's kernels are Triton kernels for CUDA", "liger_kernel"),
    "qlora": (check_qlora, "bitsandbytes 4-bit loading needs CUDA", "bitsandbytes"),
    "torch_compile": (check_torch_compile, "compiling takes minutes on a CPU; the test suite covers it there", None),
}


if __name__ == "__main__":
    main()

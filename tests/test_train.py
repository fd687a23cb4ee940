import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import EXACT, assert_plan_is_run, varied_rows, write_jsonl
from safetensors.torch import load_file

from loratune import TrainConfig
from loratune.core.errors import UserError
from loratune.training.loop import train
from loratune.training.setup import lr_factor


def _config(model, tmp_path, name, rows=24, **overrides):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    settings = dict(
        model=model,
        train_data=write_jsonl(data / "train.jsonl", varied_rows(rows)),
        val_data=write_jsonl(data / "val.jsonl", varied_rows(3, seed=1)),
        output_dir=str(tmp_path / name),
        epochs=1,
        **EXACT,
        learning_rate=1e-3,
        max_length=256,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _metrics(run, event="train"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def _adapter(run, folder="last"):
    return load_file(run / folder / "adapter_model.safetensors")


def _assert_same_adapter(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol)


@pytest.mark.parametrize("packing", [True, False])
def test_accumulation_does_not_change_the_update(tiny_model, tmp_path, packing):
    """8 x 1 and 2 x 4 on the same examples of very different lengths: same gradients, same adapter."""
    one = train(_config(tiny_model, tmp_path, "one", batch_size=8, gradient_accumulation_steps=1, packing=packing))
    four = train(_config(tiny_model, tmp_path, "four", batch_size=2, gradient_accumulation_steps=4, packing=packing))
    assert one["steps"] == four["steps"] == 3
    m1, m4 = _metrics(tmp_path / "one"), _metrics(tmp_path / "four")
    for a, b in zip(m1, m4):  # the step's mean loss and its raw gradient norm agree step by step
        assert a["target_tokens"] == b["target_tokens"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
    _assert_same_adapter(_adapter(tmp_path / "one"), _adapter(tmp_path / "four"))
    for name, batch_size, accumulation in (("one", 8, 1), ("four", 2, 4)):
        cfg = _config(tiny_model, tmp_path, name, batch_size=batch_size, gradient_accumulation_steps=accumulation)
        assert_plan_is_run(cfg.model_copy(update={"packing": packing}), tmp_path / name)


def test_packed_and_padded_give_the_same_adapter(tiny_model, tmp_path, capsys):
    shares = {}
    for name in ("packed", "padded"):
        train(
            _config(tiny_model, tmp_path, name, batch_size=4, gradient_accumulation_steps=2, packing=name == "packed")
        )
        shares[name] = _metrics(tmp_path / name)[0]["padding_share"]
        first_step = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 1/"))
        assert f"| padding {shares[name]:.0%} |" in first_step  # the progress line shows what metrics.jsonl records
    assert shares["packed"] == 0 and shares["padded"] > 0.005
    _assert_same_adapter(_adapter(tmp_path / "packed"), _adapter(tmp_path / "padded"))


def test_without_validation_nothing_is_said_of_validation_loss(tiny_model, tmp_path, capsys):
    train(
        _config(tiny_model, tmp_path, "noval", val_data=None, val_ratio=0, batch_size=4, gradient_accumulation_steps=2)
    )
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done in")]
    assert len(done) == 1 and done[0].endswith(
        f": all epochs done; adapter in {tmp_path / 'noval' / 'adapter'}; report in {tmp_path / 'noval' / 'report.md'}"
    ), done
    assert "validation loss" not in (tmp_path / "noval" / "report.md").read_text()


def test_torch_compile_keeps_the_loss(tmp_path):
    """Compiled decoder layers train like eager ones: the same loss at every step and the same adapter."""
    from loratune.modeling.tiny import make_tiny_model

    model = str(make_tiny_model(tmp_path / "model", layers=1))  # one layer: fewer graphs to compile
    graphs = torch._dynamo.utils.counters["stats"]
    for flag in (False, True):
        before = graphs["unique_graphs"]
        train(
            _config(
                model,
                tmp_path,
                f"compiled-{flag}",
                rows=16,
                batch_size=4,
                gradient_accumulation_steps=2,
                torch_compile=flag,
            )
        )
        assert (graphs["unique_graphs"] > before) == flag  # the layers really ran compiled code
    eager, compiled = _metrics(tmp_path / "compiled-False"), _metrics(tmp_path / "compiled-True")
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    _assert_same_adapter(_adapter(tmp_path / "compiled-False"), _adapter(tmp_path / "compiled-True"), tol=1e-4)


def test_liger_kernels_are_refused_off_cuda(tiny_model, tmp_path):
    with pytest.raises(UserError, match="Liger's kernels run on CUDA GPUs only, this run is on cpu"):
        train(_config(tiny_model, tmp_path, "liger", liger_kernels=True))
    assert not (tmp_path / "liger").exists()


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="Liger's kernels need a CUDA GPU and the liger-kernel package",
)
def test_liger_kernels_keep_the_loss(tiny_model, tmp_path):
    for flag in (False, True):  # eager first: Liger replaces transformers' RoPE function for the whole process
        train(_config(tiny_model, tmp_path, f"liger-{flag}", device="cuda", liger_kernels=flag))
    for a, b in zip(_metrics(tmp_path / "liger-False"), _metrics(tmp_path / "liger-True"), strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4)
    _assert_same_adapter(_adapter(tmp_path / "liger-False"), _adapter(tmp_path / "liger-True"), tol=1e-3)


def test_warmup_then_cosine_schedule(tiny_model, tmp_path):
    cfg = _config(
        tiny_model,
        tmp_path,
        "sched",
        rows=40,
        batch_size=2,
        gradient_accumulation_steps=2,
        warmup_ratio=0.25,
        lr_scheduler="cosine",
        learning_rate=1e-3,
    )
    train(cfg)
    lrs = [r["lr"] for r in _metrics(tmp_path / "sched")]
    assert len(lrs) == 10  # 40 examples / 4 per step
    warmup = math.ceil(0.25 * 10)  # = 3 steps rising linearly, then cosine down from the peak
    expected = [1e-3 * (k + 1) / (warmup + 1) for k in range(warmup)]
    expected += [1e-3 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (10 - warmup))) for k in range(warmup, 10)]
    assert lrs == pytest.approx(expected, rel=1e-4)
    assert lr_factor("linear", 0, 4)(2) == 0.5


def test_same_seed_same_adapter_bytes(tiny_model, tmp_path):
    for name in ("a", "b"):
        train(_config(tiny_model, tmp_path, name, batch_size=4, gradient_accumulation_steps=2, lora_dropout=0.1))
    assert (tmp_path / "a/last/adapter_model.safetensors").read_bytes() == (
        tmp_path / "b/last/adapter_model.safetensors"
    ).read_bytes()


def test_cli_end_to_end_adapter_reloads_in_peft(tiny_model, tmp_path):
    """Train through the CLI, reload the adapter with plain PEFT, and find the trained model's validation loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratune.data.encode import Encoder
    from loratune.data.prepare import prepare

    cfg = _config(tiny_model, tmp_path, "cli", rows=32, epochs=2, batch_size=4, gradient_accumulation_steps=2)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.model_dump(exclude_defaults=True).items()]
    result = subprocess.run([sys.executable, "-m", "loratune", "train", *flags], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "cli"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["stop_reason"] == "all epochs done"
    assert {"step", "epoch", "loss", "lr", "tokens_per_s", "target_tokens_per_s"} <= set(_metrics(run)[0])
    assert summary["unit"] == "target tokens" and summary["target_tokens"] == sum(
        r["target_tokens"] for r in _metrics(run)
    )
    assert "of them answer tokens (the ones with loss)" in (run / "report.md").read_text()
    assert [r["step"] for r in _metrics(run, "eval")] == [4, 8]
    assert (run / "config.yaml").is_file() and (run / "adapter" / "adapter_config.json").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "last").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "last")
    val = prepare(cfg, Encoder(tokenizer, tokenizer.chat_template)).val
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(val.input_ids, val.labels):
            logits = model(input_ids=torch.tensor(ids)[None]).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(
                logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels[1:] != -100).sum())
    assert math.isclose(total / count, summary["last_val_loss"], rel_tol=1e-5)
    # and the untrained base is clearly different, so the comparison above is meaningful
    with model.disable_adapter(), torch.no_grad():
        ids, labels = val.input_ids[0], val.labels[0]
        logits = model(input_ids=torch.tensor(ids)[None]).logits[0, :-1]
        base_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100).item()
    assert abs(base_loss - summary["last_val_loss"]) > 0.05


def test_last_adapter_is_the_last_step_s_whichever_step_is_best(tiny_model, tmp_path):
    """last/ holds the final weights: the same files as adapter/ when the last step is the best, and not the best
    step's when an earlier one is (a min_delta no validation loss can meet keeps the first). The two runs train
    alike: their last adapters are the same bytes."""
    for name, min_delta in (("best-last", 0.0), ("best-first", 100.0)):
        summary = train(
            _config(
                tiny_model, tmp_path, name, batch_size=4, gradient_accumulation_steps=2, eval_every_steps=1,
                early_stopping_patience=0, early_stopping_min_delta=min_delta,
            )
        )  # fmt: skip
        assert summary["best_step"] == (summary["steps"] if name == "best-last" else 1)
    files = {f"{run}/{folder}": {p.name: p.read_bytes() for p in (tmp_path / run / folder).iterdir()}
             for run in ("best-last", "best-first") for folder in ("last", "adapter")}  # fmt: skip
    assert files["best-last/last"] == files["best-last/adapter"]
    weights = "adapter_model.safetensors"
    assert files["best-first/last"][weights] != files["best-first/adapter"][weights]
    assert files["best-first/last"][weights] == files["best-last/last"][weights]

"""A run says what it does from its first step on: its phases in metrics.jsonl (for the UI) and on the CLI's
progress line; the held-out test's answers counted as they come; a resumed run keeps the base model's scores."""

import io
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import varied_rows, write_jsonl
from rich.console import Console as RichConsole

from loratune import TrainConfig, train
from loratune.core.console import Console, StepProgress
from loratune.training import loop, outputs
from loratune.training.signals import Interrupted


def _config(model: str, tmp_path, **extra) -> TrainConfig:
    settings = dict(
        model=model,
        train_data=write_jsonl(tmp_path / "train.jsonl", varied_rows(12)),
        val_data=write_jsonl(tmp_path / "val.jsonl", varied_rows(4, seed=1)),
        test_data=write_jsonl(tmp_path / "test.jsonl", varied_rows(3, seed=2)),
        output_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size=4,
        gradient_accumulation_steps=1,
        eval_every_steps=2,
        early_stopping_patience=0,
        precision="fp32",
        device="cpu",
        max_length=256,
    )
    return TrainConfig(**(settings | extra))


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _events(records: list[dict]) -> list[str]:
    """Each record in a word: a phase with its count, else its event and step."""
    out = []
    for r in records:
        if r["event"] == "phase":
            out.append(f"{r['text']} {r['done']}/{r['total']}" if "total" in r else r["text"])
        else:
            out.append(f"{r['event']} {r['step']}")
    return out


def test_a_run_writes_its_phases_in_order_with_the_held_out_count(tiny_model, tmp_path, capsys):
    cfg = _config(tiny_model, tmp_path)
    train(cfg)
    records = _records(tmp_path / "run")
    assert _events(records) == [
        "answering the held-out test, base model 0/3",
        "answering the held-out test, base model 3/3",
        "test 0",
        "training",
        "train 1",
        "train 2",
        "validating at step 2",
        "eval 2",
        "saving a checkpoint at step 2",
        "training",
        "train 3",
        "validating at step 3",
        "eval 3",
        "saving a checkpoint at step 3",
        "saving the adapter",
        "answering the held-out test, fine-tuned 0/3",
        "answering the held-out test, fine-tuned 3/3",
    ]
    assert all(isinstance(r["time"], float) for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    base = next(r for r in records if r["event"] == "test")
    assert base["exact_match"] == summary["test_before"]["exact_match"]
    assert base["samples"] == summary["test_before"]["samples"]
    # The CLI (not a terminal here) prints the counts and when training starts.
    out = capsys.readouterr().out
    assert out.index("answering the held-out test, base model 0/3") < out.index("training\n") < out.index("step 1/3")


def test_resume_keeps_the_base_models_scores_and_does_not_answer_again(tiny_model, tmp_path, monkeypatch):
    cfg = _config(tiny_model, tmp_path, save_every_steps=1)
    log_step = loop.log_step

    def stop_after_step_2(s, r, epoch):  # as Ctrl-C after step 2: a checkpoint, then Interrupted
        log_step(s, r, epoch)
        if s.state.step == 2:
            s.stop.requested, s.stop.signal_name = True, "SIGINT"

    monkeypatch.setattr(loop, "log_step", stop_after_step_2)
    with pytest.raises(Interrupted):
        train(cfg)
    first = next(r for r in _records(tmp_path / "run") if r["event"] == "test")
    monkeypatch.setattr(loop, "log_step", log_step)

    answered = []
    test_scores = outputs.test_scores

    def counted(s, label, before=None):
        answered.append(label)
        return test_scores(s, label, before)

    monkeypatch.setattr(outputs, "test_scores", counted)
    summary = train(cfg, resume=True)
    assert answered == ["fine-tuned"]
    assert summary["test_before"] == {k: first[k] for k in ("exact_match", "overlap_f1", "samples")}
    assert [r["event"] for r in _records(tmp_path / "run")].count("test") == 1


def test_answers_a_batch_at_a_time_are_those_of_one_call(tiny_model, tmp_path):
    from loratune.data.encode import encoder_for
    from loratune.data.prepare import read_examples
    from loratune.modeling.evaluate import answer
    from loratune.modeling.model import load_model, load_tokenizer

    cfg = _config(tiny_model, tmp_path)
    examples = read_examples(write_jsonl(tmp_path / "many.jsonl", varied_rows(20, seed=3)), "test", cfg)
    tokenizer = load_tokenizer(tiny_model)
    encoder = encoder_for(tokenizer, cfg)
    model = load_model(tiny_model, torch.float32, "cpu")
    said = {"metrics": [], "progress": []}
    s = SimpleNamespace(model=model, tokenizer=tokenizer, encoder=encoder)
    for where, counts in said.items():
        setattr(s, where, SimpleNamespace(phase=lambda key, text, counts=counts, **n: counts.append(tuple(n.values()))))
    assert outputs.answers(s, examples, "answering") == answer(model, tokenizer, encoder, examples)
    assert said["metrics"] == said["progress"] == [(0, 20), (16, 20), (20, 20)]


def test_the_terminal_bar_shows_the_phase_and_the_held_out_count():
    console = Console()
    console.out = RichConsole(file=io.StringIO(), force_terminal=True, width=120)
    console.live = True
    progress = StepProgress(console, total=10, done=0)
    try:
        progress.phase("test", "answering the held-out test, base model", done=16, total=50)
        shown = {t.description: (t.completed, t.total) for t in progress.bar.tasks if t.visible}
        assert shown == {"answering the held-out test, base model": (16, 50)}
        progress.phase("train", "training")
        progress.update(3, 0.3, 1.0, 1e-4, 100.0, 0.1)
        progress.phase("validate", "validating at step 3")
        shown = {t.description: (t.completed, t.total) for t in progress.bar.tasks if t.visible}
        assert shown == {"validating at step 3": (3, 10)}
        progress.phase("train", "training")
        assert [t.description for t in progress.bar.tasks if t.visible] == ["train"]
    finally:
        progress.close()


# --- The plan's peak is the process's: its runtime and the held-out answers ---------------------------------------


def test_the_runtime_is_measured_once_per_machine_then_read_back(monkeypatch):
    from loratune.core import device

    device.cpu_runtime_bytes.cache_clear()
    measured = device.cpu_runtime_bytes()
    assert measured > 100 * 2**20  # at least PyTorch's own libraries
    device.cpu_runtime_bytes.cache_clear()

    def no_probe(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(device.subprocess, "run", no_probe)
    assert device.cpu_runtime_bytes() == measured


def test_the_plan_counts_the_process_and_the_widest_held_out_batch(tiny_model, tmp_path):
    from loratune.commands.plan import plan_run
    from loratune.core.device import KEPT_FREE_BYTES, cpu_runtime_bytes
    from loratune.data.encode import encoder_for
    from loratune.data.prepare import read_examples
    from loratune.memory.arithmetic import MemoryModel
    from loratune.memory.planner import HEAP_FRAGMENTATION, held_out_batch
    from loratune.memory.shape import read_shape
    from loratune.modeling.model import load_tokenizer

    cfg = _config(tiny_model, tmp_path, test_data=write_jsonl(tmp_path / "many.jsonl", varied_rows(20, seed=3)))
    encoder = encoder_for(load_tokenizer(tiny_model), cfg)
    prompts = sorted(len(encoder.prompt_ids(ex)) for ex in read_examples(cfg.test_data, "test", cfg))
    rows, prompt, new = held_out_batch(cfg)
    assert (rows, prompt) == (16, prompts[-1]) and new > 16  # the widest of the batches `answers` makes

    plan = plan_run(cfg)
    without = plan_run(cfg.model_copy(update={"test_data": None}))
    mm = MemoryModel.for_run(cfg, read_shape(tiny_model, cfg), "cpu", torch.float32)
    assert plan.total == sum(plan.items.values())
    assert plan.total - without.total == mm.generation_bytes(rows, prompt, new)
    largest = without.largest_pass
    kept = KEPT_FREE_BYTES + int(HEAP_FRAGMENTATION * mm.pass_bytes(largest["tokens"], largest["targets"]).total)
    runtime = {k: v for k, v in without.items.items() if "Python" in k or "allocator" in k}
    assert sorted(runtime.values()) == sorted([cpu_runtime_bytes(), kept])

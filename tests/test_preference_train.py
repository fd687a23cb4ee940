"""Preference objectives on the training loop: a DPO run end to end, the same update for any split of a step into
passes, kill-and-resume, bad rows and settings refused in one line; ORPO, SimPO and KTO train too."""

import json
import math
import signal

import numpy as np
import pytest
import torch
from conftest import EXACT, assert_same_adapter, kto_rows, pair_rows, run_metrics, train_killed_at_pass, write_jsonl
from distributed_runs import ONE, Job, assert_same_steps, relative_difference
from safetensors.torch import load_file

from loratune import TrainConfig
from loratune.cli import main
from loratune.core.errors import UserError
from loratune.core.presets import guide_warnings
from loratune.core.sources import resolve
from loratune.training.loop import train


def _settings(model, tmp_path, name, rows=None, **overrides) -> dict:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    settings = dict(
        model=model,
        objective="dpo",
        train_data=write_jsonl(data / "train.jsonl", rows or pair_rows(24)),
        val_data=write_jsonl(data / "val.jsonl", pair_rows(3, seed=1)),
        output_dir=str(tmp_path / name),
        epochs=1,
        **EXACT,
        learning_rate=1e-3,
        max_length=256,
    )
    return settings | overrides


def test_dpo_trains_end_to_end_and_its_adapter_loads_with_peft(tiny_model, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    flags = _settings(tiny_model, tmp_path, "run", batch_size=4, gradient_accumulation_steps=2, epochs=2)
    assert main(["train", *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items())]) == 0
    out = capsys.readouterr().out
    assert "data: 27 rows (pairs): 24 training, 3 validation pairs" in out
    assert "step 6: validation loss " in out and "; reward accuracy " in out
    run = tmp_path / "run"
    steps, evals = run_metrics(run), run_metrics(run, "eval")
    assert len(steps) == 6 and len(evals) == 2
    # counted in pairs, the unit the loss is a mean over, under that name in the step lines, summary and report
    assert steps[0]["pairs"] == 8 and "pairs_per_s" in steps[0] and "target_tokens" not in steps[0]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["unit"], summary["pairs"]) == ("pairs", 48) and "target_tokens" not in summary
    report = (run / "report.md").read_text()
    assert f"- {summary['tokens']:,} tokens processed in 48 pairs" in report and " pairs) |" in report
    # The adapter starts at zero: the policy is its reference, every pair's loss is log 2 and its rewards 0.
    assert math.isclose(steps[0]["loss"], math.log(2), rel_tol=1e-6)
    assert steps[0]["chosen_reward"] == steps[0]["rejected_reward"] == 0
    assert steps[-1]["reward_margin"] != 0 and 0 <= steps[-1]["reward_accuracy"] <= 1
    assert {"val_reward_accuracy", "val_reward_margin", "val_chosen_logp"} <= evals[-1].keys()
    assert evals[-1]["val_loss"] < math.log(2)  # 12 examples x 2 epochs at 1e-3 separate the validation pairs too
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter")
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("objective, packing", [("dpo", True), ("dpo", False), ("orpo", True), ("simpo", False)])
def test_the_update_is_the_same_for_any_split_into_passes(tiny_model, tmp_path, objective, packing):
    """8 x 1 and 2 x 4 on the same pairs of very different lengths: the same losses, gradients and adapter."""
    common = dict(objective=objective, packing=packing)
    one = train(TrainConfig(**_settings(tiny_model, tmp_path, "one", batch_size=8, gradient_accumulation_steps=1,
                                        **common)))  # fmt: skip
    four = train(TrainConfig(**_settings(tiny_model, tmp_path, "four", batch_size=2, gradient_accumulation_steps=4,
                                         **common)))  # fmt: skip
    assert one["steps"] == four["steps"] == 3
    for a, b in zip(run_metrics(tmp_path / "one"), run_metrics(tmp_path / "four")):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
        assert math.isclose(a["reward_margin"], b["reward_margin"], rel_tol=1e-4, abs_tol=1e-7)
    assert_same_adapter(tmp_path / "one" / "last", tmp_path / "four" / "last")


def _run(flags: dict, kill_at: int = 0, resume: bool = False, cache=None):
    given = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if v is not None]
    env = {"LORATUNE_CACHE": str(cache)} if cache else None
    return train_killed_at_pass("loratune.modeling.preference.PreferenceForward", given, kill_at, resume, env)


def test_dpo_over_two_processes_equals_one_process(tiny_model, tmp_path):
    """`--num-processes 2` on the default device (as users launch it) with accumulation 2 against one process with
    accumulation 4: the same steps and metrics, validation (whose 3 pairs the processes share 2 + 1) and adapter.
    Each run computes its reference log-probabilities (a cache of its own), each process saving its share."""
    job = Job(tiny_model, tmp_path, rows=pair_rows, flags=("--objective", "dpo"))
    _, one = job.run("one", ONE, "--gradient-accumulation-steps", "4", env={"LORATUNE_CACHE": str(tmp_path / "c1")})
    result, two = job.run("two", ["-m", "loratune", "train", "--num-processes", "2"], "--gradient-accumulation-steps",
                          "2", env={"LORATUNE_CACHE": str(tmp_path / "c2")})  # fmt: skip
    assert "engine: DDP, 2 processes on 1 node" in result.stdout
    saved = [np.load(f)["keys"] for f in (tmp_path / "c2" / "reference").glob("*/*.npz")]
    assert len({k.tobytes() for keys in saved for k in keys}) == 2 * (32 + 3)  # both processes' shares
    assert_same_steps(one, two)
    for a, b in zip(run_metrics(one) + run_metrics(one, "eval"), run_metrics(two) + run_metrics(two, "eval")):
        for name in ("loss", "reward_margin", "chosen_logp", "val_loss", "val_reward_margin", "val_reward_accuracy"):
            if name in a:
                assert math.isclose(a[name], b[name], rel_tol=1e-5, abs_tol=1e-7), (name, a, b)
    assert run_metrics(one)[-1]["reward_margin"] != 0  # the steps moved the adapter off its reference
    for adapter in ("last", "adapter"):
        assert relative_difference(one / adapter, two / adapter) <= 1e-4


def test_killed_dpo_run_resumes_to_the_uninterrupted_adapter(tiny_model, tmp_path):
    """Unpacked, 2 x 3: every step takes 3 passes; killed in the middle of step 2, with LoRA dropout (its random
    state is restored with the checkpoint)."""
    common = dict(rows=pair_rows(12), batch_size=2, gradient_accumulation_steps=3, save_every_steps=1,
                  lora_dropout=0.1, packing=False, val_data=None, val_ratio=0)  # fmt: skip
    train(TrainConfig(**_settings(tiny_model, tmp_path, "reference", **common)))
    flags = _settings(tiny_model, tmp_path, "run", **common)
    result = _run(flags, kill_at=5, cache=tmp_path / "cache")  # the 2nd pass of step 2
    assert result.returncode == -signal.SIGKILL, result.stderr[-1500:]
    # step 1's checkpoint left its 6 pairs' reference log-probabilities on disk for the resumed run
    stored = [np.load(f)["values"] for f in (tmp_path / "cache" / "reference").glob("*/*.npz")]
    assert sum(map(len, stored)) == 12 and all(np.isfinite(v).all() for v in stored)
    result = _run(flags, resume=True, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-1500:]
    assert "resuming from" in result.stdout
    assert_same_adapter(tmp_path / "run" / "last", tmp_path / "reference" / "last", tol=1e-6)
    assert [m["step"] for m in run_metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "hi", "chosen": "yes", "rejected": "yes"}, "chosen and rejected are the same answer"),
        ({"prompt": "hi", "chosen": 3, "rejected": "no"}, "chosen"),
    ],
)
def test_a_bad_pair_row_is_one_line_with_file_and_line(tiny_model, tmp_path, capsys, row, problem):
    rows = [{"prompt": "hi", "chosen": "yes", "rejected": "no"}] * 2 + [row]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code = main(["train", f"--model={tiny_model}", "--objective=dpo", f"--train-data={path}", "--device=cpu",
                 f"--output-dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path} line 3: ") and problem in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, said",
    [
        ({"beta": "0.2"}, "beta = '0.2' (from --beta): is for objective dpo or kto, and this run's objective is sft"),
        ({"objective": "orpo", "simpo_gamma": "1"}, "simpo_gamma = '1' (from --simpo-gamma): is for objective simpo"),
        (
            {"objective": "dpo", "truncation": "drop"},
            "objective = 'dpo' (from --objective): truncation=drop is for sft",
        ),
        (
            {"objective": "dpo", "dpo_loss": "hinge"},
            "dpo_loss = 'hinge' (from --dpo-loss): must be one of: sigmoid, ipo",
        ),
    ],
)
def test_settings_of_another_objective_are_refused_in_one_line(flags, said):
    with pytest.raises(UserError) as e:
        resolve(flags=flags)
    assert str(e.value).startswith(said) and "\n" not in str(e.value)


def test_the_preference_preset_is_dpo_and_still_warned_outside_the_guide_ranges():
    cfg = resolve(preset="preference").config
    assert (cfg.objective, cfg.beta, cfg.dpo_loss) == ("dpo", 0.1, "sigmoid")
    assert any(w.startswith("learning_rate=2e-05 is outside the Training Guide's") for w in guide_warnings(cfg))
    for name in ("batch_size", "gradient_accumulation_steps", "max_length", "learning_rate", "epochs"):
        assert name in TrainConfig.model_fields  # the Guide's names stay
    assert TrainConfig().objective == "sft"


@pytest.mark.parametrize(
    "objective, metric",
    [("orpo", "reward_margin"), ("simpo", "reward_accuracy"), ("kto", "kl"), ("dpo", "chosen_logp")],
)
def test_each_objective_trains_a_step_and_logs_its_metrics(tiny_model, tmp_path, objective, metric):
    extra = {"dpo_loss": "ipo"} if objective == "dpo" else {}
    rows = kto_rows(16) if objective == "kto" else pair_rows(8)
    settings = _settings(tiny_model, tmp_path, objective, rows=rows, val_data=None, val_ratio=0, batch_size=4,
                         gradient_accumulation_steps=2, objective=objective, **extra)  # fmt: skip
    assert train(TrainConfig(**settings))["steps"] == (2 if objective == "kto" else 1)
    step = run_metrics(tmp_path / objective)[0]
    assert math.isfinite(step["loss"]) and math.isfinite(step[metric]) and step["grad_norm"] > 0


def test_reference_logprobs_are_computed_once_and_give_the_same_run(tiny_model, tmp_path, monkeypatch):
    """Two epochs: the reference runs in the first epoch's passes and the first validation only; a run that
    computes it in every pass trains the same adapter."""
    from loratune.modeling import objective
    from loratune.modeling.preference import PreferenceForward

    computed, forward, batch = [0], PreferenceForward.forward, objective.Pairs.batch

    def counting(self, sequences, reference=None):
        computed[0] += reference is None
        return forward(self, sequences, reference)

    def uncached(self, *args):
        out = batch(self, *args)
        out.reference = None
        return out

    monkeypatch.setattr(PreferenceForward, "forward", counting)
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))  # none computed by other tests' runs
    settings = dict(batch_size=4, gradient_accumulation_steps=2, epochs=2)
    train(TrainConfig(**_settings(tiny_model, tmp_path, "cached", **settings)))
    cached, computed[0] = computed[0], 0
    assert cached == 6 + 1  # epoch 1: 6 passes of 4 pairs; the first validation: 1 pass

    # A repeated run takes them all from the disk cache, and trains the same adapter to the bit.
    train(TrainConfig(**_settings(tiny_model, tmp_path, "again", **settings)))
    assert computed[0] == 0
    for name, tensor in load_file(tmp_path / "cached" / "last" / "adapter_model.safetensors").items():
        assert torch.equal(tensor, load_file(tmp_path / "again" / "last" / "adapter_model.safetensors")[name])

    monkeypatch.setattr(objective.Pairs, "batch", uncached)
    train(TrainConfig(**_settings(tiny_model, tmp_path, "every", **settings)))
    assert computed[0] == 2 * cached
    assert_same_adapter(tmp_path / "cached" / "last", tmp_path / "every" / "last")
    for a, b in zip(run_metrics(tmp_path / "cached", "eval"), run_metrics(tmp_path / "every", "eval")):
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-6)


def test_prepare_counts_pairs_truncated_and_dropped_and_refuses_the_wrong_shape(tiny_model, tmp_path):
    from loratune.data.encode import encoder_for
    from loratune.data.prepare import prepare
    from loratune.modeling.model import load_tokenizer

    long = {"prompt": "order " * 60, "chosen": "mugs", "rejected": "lamps"}  # the prompt is cut from the left
    too_long = {"prompt": "hi", "chosen": "order " * 80, "rejected": "no"}  # the answer alone is over max_length
    rows = [*pair_rows(6), long, too_long]
    cfg = TrainConfig(**_settings(tiny_model, tmp_path, "unused", rows=rows, max_length=64, val_data=None))
    data = prepare(cfg, encoder_for(load_tokenizer(tiny_model), cfg))
    assert (len(data.train), len(data.val)) == (6, 1)  # val_ratio holds out one pair
    assert data.train.lengths.max() <= 2 * 64 and (data.train.target_counts > 0).all()
    lines = [line for _, line in data.report.lines()]
    assert lines[0] == "data: 8 rows (pairs): 6 training, 1 validation pairs"
    truncated = data.report.truncated  # the long prompt's pair and those of the longest generated prompts
    assert f"{truncated} pairs longer than max_length=64 were truncated (truncate_prompt_left)" in lines
    assert any(line.startswith("1 pairs longer than max_length=64 were dropped") for line in lines)
    assert "train.jsonl line 8" in lines[-1]
    with pytest.raises(UserError, match=r"rows of shape pairs .* but objective kto trains on kto rows"):
        prepare(cfg.model_copy(update={"objective": "kto"}), encoder_for(load_tokenizer(tiny_model), cfg))

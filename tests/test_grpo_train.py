"""GRPO on the training loop: a run end to end with its metrics and validation by reward, the same update for any
split of a step into passes, kill-and-resume sampling the same answers, and bad prompt files refused in one line."""

import signal

import numpy as np
import pytest
from conftest import EXACT, assert_plan_is_run, assert_same_adapter, run_metrics, train_killed_at_pass, write_jsonl
from distributed_runs import ONE, Job, assert_same_steps, relative_difference
from safetensors.torch import load_file

from loratune import TrainConfig
from loratune.cli import main
from loratune.training.loop import train

WORDS = "order send mugs city leeds friday customer quantity item lamp blue red notebook please".split()


REWARDS = """
import math


def short(prompts, completions, reference, **columns):
    assert len(reference) == len(completions)  # the rows' answers, one per sampled answer
    return [-abs(len(c) - 12) / 12 for c in completions]


def broken(prompts, completions, **columns):
    return [1 / 0 if c == "" else 0.0 for c in completions]


def nan_when_sampled(prompts, completions, reference, **columns):
    return [1.0 if c == r else math.nan for c, r in zip(completions, reference)]
"""


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """input/output rows (an SFT shape: the output becomes the reference) of several prompt lengths."""
    rng = np.random.default_rng(seed)
    say = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    return [{"input": f"{i}: {say(rng.choice([2, 6, 12]))}", "output": say(3)} for i in range(n)]


def _settings(model, tmp_path, name, rows=None, **overrides) -> dict:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "rewards.py").write_text(REWARDS)
    settings = dict(
        model=model,
        objective="grpo",
        reward=(f"{data / 'rewards.py'}:short", "regex:a=0.5"),
        train_data=write_jsonl(data / "train.jsonl", rows or prompt_rows(8)),
        val_data=write_jsonl(data / "val.jsonl", prompt_rows(2, seed=1)),
        output_dir=str(tmp_path / name),
        epochs=1,
        **EXACT,
        learning_rate=1e-2,
        max_length=128,
        num_generations=4,
        max_new_tokens=8,
        batch_size=4,
        gradient_accumulation_steps=1,
    )
    return settings | overrides


def _flags(settings: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={x}" for k, v in settings.items() for x in (v if isinstance(v, tuple) else [v])]


def test_grpo_trains_and_logs_its_metrics_and_validates_by_reward(tiny_model, tmp_path, capsys):
    """Also: `loratune plan` resolves the run training made, and sizes a pass as its prompts' answers (4 x 4 rows)
    with what sampling them needs."""
    from loratune.commands.plan import plan_run

    run, cfg = tmp_path / "run", TrainConfig(**_settings(tiny_model, tmp_path, "run"))
    summary = train(cfg)
    assert_plan_is_run(cfg, run)
    memory = plan_run(cfg)
    assert memory.largest_pass["rows"] == 16 and any(
        k.startswith("sampling a pass's answers (16 rows") for k in memory.items
    )
    out = capsys.readouterr().out
    assert "data: 10 rows (prompts): 8 training, 2 validation prompts" in out
    assert "step 2: validation loss " in out and "; mean reward of greedy answers " in out
    steps, evals = run_metrics(run), run_metrics(run, "eval")
    assert summary["steps"] == len(steps) == 2 and len(evals) == 1
    names = {"reward", "reward_std", "reward_short", "reward_regex", "kl", "completion_length", "clipped"}
    assert names | {"zero_std_groups"} <= steps[0].keys()
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0  # the adapter starts at zero: the policy is its reference
    assert 0 < steps[0]["completion_length"] <= 8 and steps[0]["reward_std"] > 0
    assert steps[0]["reward"] == pytest.approx(steps[0]["reward_short"] + 0.5 * steps[0]["reward_regex"])
    assert evals[0]["val_loss"] == pytest.approx(-evals[0]["val_reward"])
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)


@pytest.mark.parametrize("grpo_loss, updates", [("grpo", 1), ("token", 1), ("dr_grpo", 2)])
def test_the_update_is_the_same_for_any_split_into_passes(tiny_model, tmp_path, grpo_loss, updates):
    """4 prompts x 1 pass and 1 prompt x 4 passes: the same sampled answers, rewards, losses and adapter (token: the
    loss is a mean over the step's answer tokens, counted after sampling; with 2 updates per generation the second
    step reuses the answers and clips against their sampling-time log-probabilities)."""
    common = dict(grpo_loss=grpo_loss, updates_per_generation=updates, val_data=None, val_ratio=0, learning_rate=1e-3,
                  epsilon=0.2 if updates == 1 else 0.002)  # fmt: skip
    one = train(TrainConfig(**_settings(tiny_model, tmp_path, "one", batch_size=4, gradient_accumulation_steps=1,
                                        **common)))  # fmt: skip
    four = train(TrainConfig(**_settings(tiny_model, tmp_path, "four", batch_size=1, gradient_accumulation_steps=4,
                                         **common)))  # fmt: skip
    assert one["steps"] == four["steps"] == 2 * updates
    a, b = run_metrics(tmp_path / "one"), run_metrics(tmp_path / "four")
    for x, y in zip(a, b):
        units = "answer_tokens" if grpo_loss == "token" else "sampled_answers"  # the step's count
        for name in ("reward", "completion_length", units, "zero_std_groups"):
            assert x[name] == pytest.approx(y[name], rel=1e-6), name
        for name in ("loss", "grad_norm", "kl"):
            assert x[name] == pytest.approx(y[name], rel=1e-4, abs=1e-7), name
    if updates > 1:
        assert a[0]["reward"] == a[1]["reward"] and a[1]["clipped"] > 0
    assert_same_adapter(tmp_path / "one" / "last", tmp_path / "four" / "last")


def _run(flags: dict, kill_at: int = 0, resume: bool = False):
    given = _flags({k: v for k, v in flags.items() if v is not None})
    return train_killed_at_pass("loratune.modeling.grpo.GroupForward", given, kill_at, resume)


@pytest.mark.parametrize("updates, kill_at", [(1, 4), (2, 7)])
def test_killed_grpo_run_resumes_sampling_the_same_answers(tiny_model, tmp_path, updates, kill_at):
    """2 prompts x 2 passes a step, killed in the middle of step 2: the resumed run samples step 2's answers again
    from the weights of step 1 (and its step 3 from the same step 2 update): the same rewards and adapter. With 2
    updates per generation, killed in step 4 (the 2nd update of the 2nd generation): it resumes after step 2, the
    last of a generation, and samples and updates again as the uninterrupted run did."""
    common = dict(batch_size=1, gradient_accumulation_steps=2, save_every_steps=1, val_data=None, val_ratio=0,
                  updates_per_generation=updates, epsilon=0.2 if updates == 1 else 0.002)  # fmt: skip
    train(TrainConfig(**_settings(tiny_model, tmp_path, "reference", rows=prompt_rows(6), **common)))
    flags = _settings(tiny_model, tmp_path, "run", rows=prompt_rows(6), **common)
    result = _run(flags, kill_at=kill_at)
    assert result.returncode == -signal.SIGKILL, result.stderr[-1500:]
    result = _run(flags, resume=True)
    assert result.returncode == 0, result.stderr[-1500:]
    assert "resuming from" in result.stdout
    resumed, reference = run_metrics(tmp_path / "run"), run_metrics(tmp_path / "reference")
    assert [m["step"] for m in resumed] == list(range(1, 3 * updates + 1))
    for x, y in zip(resumed, reference):
        assert (x["reward"], x["completion_length"]) == (y["reward"], y["completion_length"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-9) and x["clipped"] == y["clipped"]
    assert_same_adapter(tmp_path / "run" / "last", tmp_path / "reference" / "last", tol=1e-6)


@pytest.mark.parametrize(
    "rows, said",
    [
        ([{"text": "just some text"}], "no prompts: columns ['text']; grpo needs a 'prompt' column"),
        ([{"question": "hi", "answer": "yes"}], "no prompts: columns ['answer', 'question']"),
        ([{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}],
         "must end with a user or system turn"),
    ],
)  # fmt: skip
def test_a_file_without_prompts_is_one_line_and_writes_nothing(tiny_model, tmp_path, capsys, rows, said):
    flags = _settings(tiny_model, tmp_path, "run", rows=rows * 3)
    code = main(["train", *_flags(flags)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and said in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "reward, said, folder",
    [
        (
            "broken",
            "reward rewards.py:broken raised ZeroDivisionError: division by zero, on example 0 (prompt '0:",
            False,
        ),
        ("nan_when_sampled", "reward rewards.py:nan_when_sampled returned nan for example 0 (prompt '", True),
    ],
)
def test_a_failing_reward_is_one_line_and_leaves_no_adapter(tiny_model, tmp_path, capsys, reward, said, folder):
    """A reward that raises on the references stops before the run folder exists; one that returns NaN for a
    sampled answer stops at the first step, before any update, checkpoint or adapter."""
    flags = _settings(tiny_model, tmp_path, "run", rows=[{"prompt": f"{i}: hi", "reference": ""} for i in range(4)])
    flags["reward"] = f"{tmp_path / 'data' / 'rewards.py'}:{reward}"
    code = main(["train", *_flags(flags)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and said in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    run = tmp_path / "run"
    assert run.exists() == folder
    if folder:
        assert not (run / "adapter").exists() and not (run / "checkpoints").exists() and not run_metrics(run)


def test_grpo_over_two_processes_equals_one_process(tiny_model, tmp_path):
    """`--num-processes 2` with accumulation 2 against one process with accumulation 4, the loss a mean over the
    step's answer tokens (each process counts its own, the step sums them): the same answers, steps, validation
    (whose 3 prompts the processes share 2 + 1) and adapter."""
    flags = ("--objective", "grpo", "--reward", "regex:a", "--num-generations", "4", "--max-new-tokens", "8",
             "--grpo-loss", "token")  # fmt: skip
    job = Job(tiny_model, tmp_path, rows=prompt_rows, flags=flags)
    _, one = job.run("one", ONE, "--gradient-accumulation-steps", "4")
    result, two = job.run("two", ["-m", "loratune", "train", "--num-processes", "2"], "--gradient-accumulation-steps",
                          "2")  # fmt: skip
    assert "engine: DDP, 2 processes on 1 node" in result.stdout
    assert_same_steps(one, two)
    for a, b in zip(run_metrics(one) + run_metrics(one, "eval"), run_metrics(two) + run_metrics(two, "eval")):
        for name in ("reward", "answer_tokens", "completion_length", "loss", "kl", "val_loss"):
            if name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), (name, a, b)
    for adapter in ("last", "adapter"):
        assert relative_difference(one / adapter, two / adapter) <= 1e-4

import json
import os
from pathlib import Path

import pytest

# Tests never reach a hub, and keep their caches in a temporary folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["LORATUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random tiny Llama with a ChatML template (built once per test session)."""
    from loratune.modeling.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> str:
    """The same, without a chat template (a 'base' model)."""
    from loratune.modeling.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny_plain") / "model", chat=False))


# Settings under which two runs that should train the same adapter can be compared exactly: fp32 on the CPU, with no
# dropout, warm-up, schedule or clipping to tell a split of a step from another.
EXACT = dict(
    precision="fp32", device="cpu", lora_dropout=0.0, warmup_ratio=0.0, lr_scheduler="constant", max_grad_norm=0.0
)


def run_metrics(run: Path, event: str = "train") -> list[dict]:
    """A run's metrics.jsonl records of one event."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def assert_same_adapter(a: Path, b: Path, tol: float = 1e-5) -> None:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    """The tiny model's tokenizer (per module: a test may change its template)."""
    from loratune.modeling.model import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    """The chat-template encoder of the tiny model's own template."""
    from loratune.data.encode import Encoder

    return Encoder(tokenizer, tokenizer.chat_template)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def varied_rows(n: int, seed: int = 0):
    """Input/output rows whose lengths differ several-fold, as in real instruction data."""
    import random

    rng = random.Random(seed)
    words = "order send mugs city leeds friday customer quantity item lamp blue red notebook please".split()
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.choice([3, 8, 20, 45])))
        answer = " ".join(rng.choice(words) for _ in range(rng.choice([2, 6, 15, 30])))
        rows.append({"input": f"{i}: {prompt}", "output": answer})
    return rows


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversation pairs whose prompts and answers differ several-fold in length."""
    import random

    rng = random.Random(seed)
    words = "order send mugs city leeds friday customer quantity item lamp blue red notebook please".split()
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [
        {
            "prompt": [{"role": "user", "content": f"{i}: {say(rng.choice([3, 8, 20]))}"}],
            "chosen": [{"role": "assistant", "content": say(rng.choice([2, 6, 15]))}],
            "rejected": [{"role": "assistant", "content": say(rng.choice([2, 6, 15])) + " no"}],
        }
        for i in range(n)
    ]


def kto_rows(n: int) -> list[dict]:
    return [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in pair_rows(n // 2)
        for side in ("chosen", "rejected")
    ]


def assert_plan_is_run(cfg, run: Path, **made_smaller) -> None:
    """`loratune plan` resolves the run training wrote to resolved.json (with the micro-batch training then made
    smaller after running out of memory, when given)."""
    from loratune.commands.plan import plan_run

    planned = plan_run(cfg).resolved
    assert planned | made_smaller == json.loads((run / "resolved.json").read_text())


def _train_tiny(model: str, root: Path, rows, **settings) -> Path:
    """A finished 6-step run of `model` on 24 of `rows(n, seed)` with 4 for validation (every 2 steps)."""
    from loratune import TrainConfig, train

    train(
        TrainConfig(
            model=model,
            train_data=write_jsonl(root / "train.jsonl", rows(24)),
            val_data=write_jsonl(root / "val.jsonl", rows(4, seed=1)),
            output_dir=str(root / "run"),
            epochs=2,
            batch_size=4,
            gradient_accumulation_steps=2,
            eval_every_steps=2,
            early_stopping_patience=0,
            precision="fp32",
            device="cpu",
            learning_rate=1e-3,
            max_length=256,
            **settings,
        )
    )
    return root / "run"


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    """A finished 6-step run of the tiny model with validation and test data (read-only: copy it to change it)."""
    root = tmp_path_factory.mktemp("tiny_run")
    return _train_tiny(
        tiny_model, root, varied_rows, test_data=write_jsonl(root / "test.jsonl", varied_rows(3, seed=2))
    )


@pytest.fixture(scope="session")
def tiny_dpo_run(tiny_model, tmp_path_factory) -> Path:
    """A finished 6-step DPO run of the tiny model, validated every 2 steps (read-only: copy it to change it)."""
    return _train_tiny(tiny_model, tmp_path_factory.mktemp("tiny_dpo_run"), pair_rows, objective="dpo")


# `loratune train` in a child process that kills itself before its N-th training pass through the objective's module
# (KILL_CLASS, as module.Class), as tests/fault_driver.py does for SFT's module.
KILLER = """
import importlib, os, signal, sys
from loratune.cli import main
module, name = os.environ["KILL_CLASS"].rsplit(".", 1)
cls = getattr(importlib.import_module(module), name)
at, calls, forward = int(os.environ.get("KILL_AT_PASS", 0)), [0], cls.forward
def faulty(self, *args):
    if self.training:
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, *args)
cls.forward = faulty
sys.exit(main(sys.argv[1:]))
"""


def train_killed_at_pass(module_class: str, flags: list[str], kill_at: int = 0, resume: bool = False, env=None):
    """`loratune train FLAGS` in a child process killed before its `kill_at`-th training pass (0: never), with `env`
    added to this environment."""
    import subprocess
    import sys

    args = [sys.executable, "-c", KILLER, "train", *flags, *(["--resume"] if resume else [])]
    env = {**os.environ, "KILL_AT_PASS": str(kill_at), "KILL_CLASS": module_class} | (env or {})
    return subprocess.run(args, capture_output=True, text=True, env=env)

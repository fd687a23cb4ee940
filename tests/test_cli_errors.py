"""Bad input: one line saying what, where and what is allowed; exit code 2; no traceback; nothing written."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import varied_rows, write_jsonl

from loratune.cli import main


def _setup_bad_model(kind):
    def make(tmp, tiny_model, tiny_run):
        model = tmp / "model"
        if kind == "gguf":
            model = tmp / "model.gguf"
            model.write_bytes(b"not a gguf file")
            return ["train", "--model", str(model)]
        shutil.copytree(tiny_model, model)
        if kind == "no tokenizer":
            for f in model.glob("tokenizer*"):
                f.unlink()
        else:
            weights = model / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])  # truncated
        return ["train", "--model", str(model)]

    return make


def _run_copy(change):
    def make(tmp, tiny_model, tiny_run):
        run = shutil.copytree(tiny_run, tmp / "run")
        return change(run)

    return make


def _damage_metrics(run):
    first = (run / "metrics.jsonl").read_text().splitlines()[0]
    (run / "metrics.jsonl").write_text(first + '\n{"event": "train", "st')  # cut off by a crash
    return ["report", str(run)]


def _drop_fingerprint(run):
    (run / "fingerprint.json").unlink()
    return ["train", "--resume", str(run)]


def _absent_gpu():
    import torch

    return "cuda" if torch.backends.mps.is_available() else "mps"


CASES = {
    "model without tokenizer files": (_setup_bad_model("no tokenizer"), "cannot load its tokenizer"),
    "truncated weights": (_setup_bad_model("truncated"), "cannot load its weights"),
    "not a gguf": (_setup_bad_model("gguf"), "cannot be read as a GGUF model"),
    "config not UTF-8": (
        lambda tmp, *_: (tmp / "c.yaml").write_bytes(b"\xff\xfe\x00") and ["train", str(tmp / "c.yaml")],
        "not UTF-8 text",
    ),
    "config key not a name": (
        lambda tmp, *_: (tmp / "c.yaml").write_text("1: 2\n") and ["train", str(tmp / "c.yaml")],
        "1 is not a setting name",
    ),
    "empty target modules": (lambda *_: ["train", "--lora-target-modules", ""], "must be a non-empty list"),
    "damaged metrics": (_run_copy(_damage_metrics), "metrics.jsonl line 2: not valid JSON"),
    "resume without fingerprint": (
        _run_copy(_drop_fingerprint),
        "fingerprint.json (what the data and model were) is missing",
    ),
    "resume and overwrite": (lambda tmp, m, run: ["train", "--resume", str(run), "--overwrite"], "give one of them"),
    "eval on a missing file": (
        lambda tmp, m, run: ["eval", str(run), "--data", "nope.jsonl"],
        "nope.jsonl: file not found",
    ),
    "no new tokens": (
        lambda tmp, m, run: ["generate", str(run), "--max-new-tokens", "0"],
        "--max-new-tokens: 0: must be > 0",
    ),
    "top-p above 1": (lambda tmp, m, run: ["chat", str(run), "--top-p", "5"], "--top-p: 5: must be > 0 and <= 1"),
    "prompt file without the prompt field": (
        lambda tmp, m, run: ["generate", str(run), "--file", write_jsonl(tmp / "q.jsonl", [{"question": "hi"}])],
        "q.jsonl line 1: no 'input' field, which holds the prompt of this run's input_output rows "
        "(fields here: question)",
    ),
    "column mapping to a missing column": (
        lambda tmp, m, run: ["train", "--model", m, "--columns", "input=question"],
        "columns input=question: the data has no column 'question' (its columns: input, output)",
    ),
    "column mapping the shape does not use": (
        lambda tmp, m, run: ["train", "--model", m, "--columns", "prompt=question"],
        "columns prompt=question: the data has no column 'question'",
    ),
    "data file as the model": (
        lambda tmp, m, run: ["train", "--model", write_jsonl(tmp / "d.jsonl", varied_rows(2))],
        "d.jsonl': a data file, not a model. A model is a built-in name (smollm2-135m), a model folder",
    ),
    "chat template file that is not a template": (
        lambda tmp, m, run: (
            (tmp / "t.jinja").write_text("Answer briefly.\n")
            and ["train", "--model", m, "--chat-template", str(tmp / "t.jinja")]
        ),
        "t.jinja': not a Jinja template (no {{ }} or {% %} in it); give a Jinja template file or a built-in name",
    ),
    "a GPU this machine lacks": (
        lambda tmp, m, run: ["train", "--model", m, "--device", _absent_gpu()],
        "GPU here; use auto, cpu",
    ),
    "no memory": (
        lambda *_: ["train", "--max-memory", "0"],
        "max_memory = '0' (from --max-memory): expected a size above 0",
    ),
    "plan for a GPU without memory": (
        lambda tmp, m, run: ["plan", "--model", m, "--gpu-memory", "0"],
        "--gpu-memory '0': expected a size above 0 such as 6GB",
    ),
    "true as a number": (
        lambda tmp, *_: (tmp / "c.yaml").write_text("batch_size: true\n") and ["train", str(tmp / "c.yaml")],
        "c.yaml): must be an integer > 0 or auto",
    ),
    "max_length beyond the model": (
        lambda tmp, m, run: ["train", "--model", m, "--max-length", "5000"],
        "max_length = 5000: above the 4096 positions",
    ),
    "setting given twice": (
        lambda tmp, *_: (tmp / "c.yaml").write_text("lora_r: 8\nlora_r: 16\n") and ["train", str(tmp / "c.yaml")],
        "c.yaml line 2: not valid YAML (lora_r is given twice, on lines 1 and 2)",
    ),
    "inspect: --data and --train-data": (
        lambda tmp, m, run: [
            "data",
            "inspect",
            "--model",
            m,
            "--data",
            write_jsonl(tmp / "a.jsonl", varied_rows(4)),
            "--train-data",
            write_jsonl(tmp / "b.jsonl", varied_rows(4)),
        ],
        "a.jsonl and --train-data",
    ),
    "train: --data and --train-data": (
        lambda tmp, m, run: ["train", "--model", m, "--data", write_jsonl(tmp / "a.jsonl", varied_rows(4))],
        "both give the training data: give one of them",
    ),
    "unknown reward": (
        lambda *_: ["train", "--objective", "grpo", "--reward", "json", "--reward", "nosuch=2"],
        "reward = ['json', 'nosuch=2'] (from --reward): 'nosuch=2': unknown reward; allowed: exact, regex:PATTERN",
    ),
    "reward function not in its file": (
        lambda tmp, *_: (
            (tmp / "r.py").write_text("def scores(completions, **kw):\n    return [0.0] * len(completions)\n")
            and ["train", "--objective", "grpo", "--reward", "r.py:score"]
        ),
        "reward = 'r.py:score' (from --reward): r.py defines no function 'score' at its top level",
    ),
    "empty prompt file": (
        lambda tmp, m, run: (
            (tmp / "e.jsonl").write_text("\n") and ["generate", str(run), "--file", str(tmp / "e.jsonl")]
        ),
        "e.jsonl: no rows",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, tiny_model, tiny_run, tmp_path):
    setup, message = CASES[case]
    args = setup(tmp_path, tiny_model, tiny_run)
    if args[0] == "train" and "--resume" not in args:
        data = write_jsonl(tmp_path / "train.jsonl", varied_rows(8))
        args += ["--train-data", data, "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]
    result = subprocess.run([sys.executable, "-m", "loratune", *args], capture_output=True, text=True, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-1500:]
    assert message in lines[-1] and "Traceback" not in result.stderr
    assert len(lines) == 1 or lines[0].startswith("usage:")  # argparse's own errors come after its usage lines
    assert not (tmp_path / "out").exists() and not Path(tiny_run, "..", "out").exists()


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_bad_row_advice_names_only_flags_the_command_has(command, tiny_model, tiny_run, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input": "a", "output": "b"}\nnot json\n')
    args = {
        "train": ["train", "--model", tiny_model, "--train-data", str(data), "--output-dir", str(tmp_path / "out")],
        "eval": ["eval", str(tiny_run), "--data", str(data), "--report", str(tmp_path / "out")],
        "generate": ["generate", str(tiny_run), "--file", str(data)],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2: not valid JSON" in err
    assert ("(use --skip-bad-rows to skip such rows)" in err) == (command == "train"), err


def test_quickstart_checks_its_arguments_before_printing_anything(capsys):
    assert main(["train", "--lora-r", "abc"]) == 2  # no config or data: the quickstart, with a bad flag
    assert capsys.readouterr() == ("", "error: lora_r = 'abc' (from --lora-r): must be an integer > 0\n")

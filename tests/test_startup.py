"""Commands that load no model answer at once: importing the CLI, building its parser, every --help, `config show`
and the one-line errors of bad input import none of the model libraries (torch alone takes seconds). Each case runs
in a fresh process: this one has them loaded already."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets")

PROBE = f"""
import contextlib, io, json, sys
from loratune.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as e:  # --help and argparse's usage errors
            codes.append(e.code)
print(json.dumps({{"codes": codes, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""

COMMANDS = ("", "train", "plan", "config", "config show", "generate", "eval", "chat", "report", "merge", "export")
HELP = [[*command.split(), "--help"] for command in (*COMMANDS, "pairs", "data", "data inspect", "ui")]

CASES = {
    "import only": [],
    "every --help": HELP,
    "config show": [["config", "show", "--preset", "quickstart"]],
    "bad flag": [["train", "--no-such-flag"]],
    "bad setting": [["train", "--lora-r", "abc"], ["plan", "--learning-rate", "fast"]],
    "bad setting with several processes": [["train", "--num-processes", "2", "--lora-r", "abc"]],
    "bad setting in a file": [["train", "{yaml}"]],
    "plan without memory": [["plan", "--gpu-memory", "0"]],
    "inspect without data": [["data", "inspect"]],
    "generate without a prompt": [["generate", "{run}"]],
    "export to a K-quant": [["export", "{run}", "--format", "gguf", "--type", "q4_k_m"]],
}


@pytest.mark.parametrize("case", CASES)
def test_commands_without_a_model_import_no_model_library(case, tmp_path):
    (tmp_path / "c.yaml").write_text("batch_size: true\n")
    fill = {"yaml": str(tmp_path / "c.yaml"), "run": str(tmp_path / "run")}
    argvs = [[arg.format(**fill) for arg in argv] for argv in CASES[case]]
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    # Each command got as far as its answer: --help and config show succeed, bad input exits 2.
    assert report["codes"] == [0 if case in ("every --help", "config show") else 2] * len(argvs)
    assert report["loaded"] == []


TRAIN_PROBE = """
import json, sys
from loratune.cli import main
code = main(["train", *sys.argv[1:]])
print(json.dumps({"code": code, "plotting": "matplotlib" in sys.modules}))
"""


def test_a_run_s_plots_are_drawn_outside_the_training_process(tiny_model, tmp_path):
    """`loratune train` leaves its plots to the helper process it starts before importing torch: the training
    process never imports the plotting library, and the run still has its loss plot and report."""
    from conftest import EXACT, varied_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", varied_rows(12))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in EXACT.items()]
    run = tmp_path / "run"
    argv = ["--model", tiny_model, "--train-data", data, "--max-steps", "1", "--output-dir", str(run), *flags]
    result = subprocess.run([sys.executable, "-c", TRAIN_PROBE, *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"code": 0, "plotting": False}
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training and validation loss](loss.png)" in (run / "report.md").read_text()

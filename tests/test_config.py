import subprocess
import sys
from pathlib import Path

import pytest

from loratune.core.config import GUIDE_FIELDS, TrainConfig
from loratune.core.errors import UserError
from loratune.core.presets import PRESETS, guide_warnings
from loratune.core.sources import resolve

GUIDE_DEFAULTS = {
    "batch_size": 8,
    "gradient_accumulation_steps": 8,
    "max_length": 1024,
    "learning_rate": 2e-4,
    "epochs": 20,
    "warmup_ratio": 0.05,
    "lora_r": 8,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
}


def test_defaults_are_the_training_guides():
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in GUIDE_FIELDS} == GUIDE_DEFAULTS
    assert resolve(preset="balanced").config.model_dump() == resolve().config.model_dump()
    assert PRESETS["balanced"].values == {}


def test_precedence_default_preset_yaml_flags(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("preset: high_capacity\nlearning_rate: 5e-5\nlora_r: 16\nepochs: 3\n")
    r = resolve(str(run), flags={"lora_r": "24"})
    c, src = r.config, r.sources
    assert (c.lora_r, src["lora_r"]) == (24, "--lora-r")  # flag beats YAML
    assert (c.learning_rate, src["learning_rate"]) == (5e-5, str(run))  # YAML beats preset (PyYAML reads 5e-5 as text)
    assert (c.lora_alpha, src["lora_alpha"]) == (64, "preset high_capacity")  # preset beats default
    assert (c.batch_size, src["batch_size"]) == (8, "default")
    assert c.output_dir == "runs/run"
    # --preset on the command line beats the file's preset
    assert resolve(str(run), preset="memory_saver").config.gradient_checkpointing is True


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"batch_size": "eight"}, "batch_size = 'eight' (from --batch-size): must be an integer > 0 or auto"),
        ({"batch_size": "0"}, "batch_size = '0' (from --batch-size): must be an integer > 0 or auto"),
        ({"learning_rate": "-1e-4"}, "learning_rate = '-1e-4' (from --learning-rate): must be a number > 0"),
        ({"lora_dropout": "1"}, "lora_dropout = '1' (from --lora-dropout): must be a number >= 0 and < 1"),
        ({"lr": "1"}, "unknown setting 'lr' (from --lr)"),
        ({"train_data": "missing.jsonl"}, "train_data = 'missing.jsonl' (from --train-data): file not found"),
        ({"precision": "int4"}, "precision = 'int4' (from --precision): must be one of: auto, bf16, fp16, fp32"),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(flags, expected):
    with pytest.raises(UserError) as e:
        resolve(flags=flags)
    assert str(e.value) == expected


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("learning_rat: 1e-4\n")
    with pytest.raises(
        UserError, match=r"unknown setting 'learning_rat' \(from .*run.yaml\); did you mean learning_rate\?"
    ):
        resolve(str(run))


def test_guide_ranges_warn_and_quote_the_guide():
    assert guide_warnings(TrainConfig()) == []
    warnings = guide_warnings(TrainConfig(learning_rate=1e-3, lora_r=4, lora_alpha=32, batch_size=2))
    assert len(warnings) == 4
    assert any("learning_rate=0.001" in w and "risk instability" in w for w in warnings)
    assert any("lora_alpha=32 is not 2x-4x lora_r=4" in w for w in warnings)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "loratune", *args], capture_output=True, text=True)


def test_cli_bad_value_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = _cli("train", "--train-data", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: train_data = '{tmp_path / 'nope.jsonl'}' (from --train-data): file not found"
    ]
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_train_help_shows_every_field_with_its_description():
    result = _cli("train", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the help
    for name, field in TrainConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(field.description.split()) in text, name
    assert "option_strings" not in text  # a bare "%" in a help text made argparse print its own dict there


def test_config_show_prints_the_guide_defaults_and_sources():
    result = _cli("config", "show", "--lora-r", "16")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if not line.startswith("#")}
    for name, value in GUIDE_DEFAULTS.items():
        if name != "lora_r":
            assert rows[name][0] == str(value) and rows[name][1] == "default"
    assert rows["lora_r"] == ["16", "--lora-r"]


@pytest.mark.parametrize("name", [name for name, f in TrainConfig.model_fields.items() if f.annotation is bool])
def test_true_false_flags_also_take_true_or_false(name, tmp_path, capsys):
    from loratune.cli import main

    config, flag = tmp_path / "run.yaml", "--" + name.replace("_", "-")
    config.write_text("lora_r: 16\n")
    for args, expected in (
        ([flag, "false", str(config)], "False"),
        ([f"{flag}=Yes"], "True"),
        ([flag, str(config)], "True"),
        ([f"--no-{flag[2:]}", str(config)], "False"),
    ):
        assert main(["config", "show", *args]) == 0
        rows = {
            line.split()[0]: line.split()[1:]
            for line in capsys.readouterr().out.splitlines()
            if not line.startswith("#")
        }
        assert rows[name] == [expected, flag], args
        assert rows["lora_r"][0] == ("16" if str(config) in args else "8"), (
            args
        )  # the word after a flag is not the config
    with pytest.raises(SystemExit):
        main(["config", "show", f"{flag}=maybe"])
    assert f"argument {flag}: 'maybe' is not one of true, yes, on, false, no, off" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --no-packing false: a double negative, refused rather than guessed
        main(["config", "show", f"--no-{flag[2:]}", "false"])
    assert f"--no-{flag[2:]}: takes no value" in capsys.readouterr().err


@pytest.mark.parametrize("prefix", ["--lr", "--batch", "--lora"])
def test_abbreviated_flags_are_refused(prefix, capsys):
    from loratune.cli import main

    with pytest.raises(SystemExit):  # argparse took --lr as --lr-scheduler and --batch as --batch-size
        main(["config", "show", prefix, "4"])
    assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("examples/*.yaml")))
def test_example_configs_resolve_to_their_presets(path):
    resolved = resolve(str(path))
    assert resolved.preset == path.stem
    assert resolved.config.train_data and Path(resolved.config.train_data).is_file()


def test_the_quickstart_run_again_goes_to_the_next_free_folder(tmp_path, capsys):
    from loratune.commands.train import next_free as _next_free

    first = tmp_path / "quickstart"
    assert _next_free(first) == str(first)
    first.mkdir()
    assert _next_free(first) == str(first)  # an empty folder is free
    (first / "summary.json").write_text("{}")
    assert _next_free(first) == str(tmp_path / "quickstart-2")
    assert "holds an earlier run" in capsys.readouterr().out

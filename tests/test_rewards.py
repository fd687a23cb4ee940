"""GRPO's rewards: the `reward` setting's syntax and its checks at config time, what each built-in scores, the user's
functions, and one line naming the reward and the example for a reward that fails. No model is needed but to build
TRL's trainer, whose scores of the same functions ours must equal."""

import json

import numpy as np
import pytest

from loratune.cli import main
from loratune.core.config import TrainConfig
from loratune.core.errors import UserError
from loratune.core.reward_spec import parse_reward
from loratune.core.sources import resolve
from loratune.data.rewards import RewardError, check_rewards, rewards_for

REFERENCE = json.dumps({"customer": "Ann", "quantity": 3, "address": {"city": "Leeds", "zip": "LS1"}})


def _rewards(*specs):
    return rewards_for(TrainConfig(objective="grpo", reward=specs))


def _score(specs, completions, tokens=None, **columns):
    n = len(completions)
    return _rewards(*specs)([f"prompt {i}" for i in range(n)], completions, columns, tokens or [0] * n)


@pytest.mark.parametrize(
    "text, name, argument, weight, label",
    [
        ("exact", "exact", None, 1.0, "exact"),
        (" json=0.5 ", "json", None, 0.5, "json"),
        ("length:200=-2", "length", "200", -2.0, "length:200"),
        ("regex:^\\{", "regex", "^\\{", 1.0, "regex:^\\{"),
        ("regex:a=b", "regex", "a=b", 1.0, "regex:a=b"),  # a pattern may hold =
        ("regex:a=1=3", "regex", "a=1", 3.0, "regex:a=1"),  # the weight is what follows the last = when a number
        ("regex:a=1", "regex", "a", 1.0, "regex:a"),
        ("dir/my.rewards.py:score=0", "function", "score", 0.0, "my.rewards.py:score"),
    ],
)
def test_reward_text_names_the_reward_its_argument_and_weight(text, name, argument, weight, label):
    spec = parse_reward(text)
    assert (spec.name, spec.argument, spec.weight, spec.label) == (name, argument, weight, label)


@pytest.mark.parametrize(
    "rewards, message",
    [
        (["nosuch"], "'nosuch': unknown reward; allowed: exact, regex:PATTERN, json, length:N, or path/to/file.py"),
        (["exact=abc"], "'exact=abc': the weight 'abc' is not a finite number"),
        (["json=inf"], "'json=inf': the weight 'inf' is not a finite number"),
        (["f.py:score=x"], "'f.py:score=x': the weight 'x' is not a finite number"),
        (["regex"], "'regex': regex needs its PATTERN: regex:PATTERN[=WEIGHT]"),
        (["regex:("], "'regex:(': not a valid regular expression (missing ), unterminated subpattern"),
        (["length:0"], "'length:0': N must be a whole number of tokens above 0"),
        (["length:2.5=1"], "'length:2.5=1': N must be a whole number of tokens above 0"),
        (["exact:x"], "'exact:x': exact takes no argument; write exact or exact=WEIGHT"),
        (["json", "json=2"], "json is given twice; give it once, with a weight if it should count more"),
        ([], "must be a non-empty list of text (YAML list, or the flag repeated)"),
    ],
)
def test_a_bad_reward_is_refused_at_config_time_in_one_line(rewards, message):
    with pytest.raises(UserError) as e:
        resolve(flags={"objective": "grpo", "reward": rewards})
    assert str(e.value).startswith(f"reward = {rewards!r} (from --reward): ")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_flag_repeats_and_yaml_gives_a_list_or_one_name(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("objective: grpo\nreward:\n  - json\n  - 'regex:^\\{=0.5'\n")
    assert resolve(str(config)).config.reward == ("json", "regex:^\\{=0.5")
    config.write_text("objective: grpo\nreward: json=2\n")
    assert resolve(str(config)).config.reward == ("json=2",)
    assert resolve(str(config), flags={"reward": ["exact", "length:9"]}).config.reward == ("exact", "length:9")
    assert main(["config", "show", str(config), "--reward", "exact", "--reward", "length:9=-1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("reward "))
    assert row.split()[-1] == "--reward" and "'exact', 'length:9=-1'" in row
    assert resolve().config.reward == ("exact",)
    with pytest.raises(
        UserError, match=r"reward = \['json'\] \(from --reward\): is for objective grpo, and this run's"
    ):
        resolve(flags={"reward": ["json"]})  # an sft run has no rewards: refused rather than silently unused
    ui_form = {"objective": "grpo", "reward": "json=2"}  # the UI's form gives one reward as text
    assert resolve(flags=ui_form).config.reward == ("json=2",)


def test_a_config_files_reward_function_is_found_beside_it(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mine.py").write_text("def score(completions, **kw):\n    return [1.0] * len(completions)\n")
    (tmp_path / "cfg" / "run.yaml").write_text("objective: grpo\nreward: [mine.py:score=2, exact]\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = resolve("cfg/run.yaml").config
    assert cfg.reward == (f"{tmp_path / 'cfg' / 'mine.py'}:score=2", "exact")
    assert rewards_for(cfg).names == ("score", "exact")
    with pytest.raises(UserError, match=r"reward = 'mine.py:score' \(from --reward\): mine.py: file not found"):
        resolve(flags={"objective": "grpo", "reward": ["mine.py:score"]})  # a flag's path is the working folder's


@pytest.mark.parametrize(
    "source, message",
    [
        ("def other(completions, **kw):\n    return []\n", "defines no function 'score' at its top level"),
        ("def score(completions:\n", "line 2: not valid Python ('(' was never closed)"),
    ],
)
def test_a_reward_file_is_read_not_run_at_config_time(source, message, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "r.py"
    path.write_text(f"open({str(marker)!r}, 'w').close()\n{source}")
    with pytest.raises(UserError) as e:
        resolve(flags={"objective": "grpo", "reward": [f"{path}:score"]})
    assert str(e.value) == f"reward = '{path}:score' (from --reward): {path} {message}"
    assert not marker.exists()
    path.write_text(f"open({str(marker)!r}, 'w').close()\nfrom helpers import score\n")  # defined by an import
    assert resolve(flags={"objective": "grpo", "reward": [f"{path}:score"]}).config.reward == (f"{path}:score",)
    assert not marker.exists()


def test_metric_names_are_words_and_distinct(tmp_path):
    (tmp_path / "r.py").write_text("def json(completions, **kw):\n    return [0.0] * len(completions)\n")
    specs = ("regex:^\\{.*$", "json", "regex:a=2", f"{tmp_path}/r.py:json", "length:5", "regex:b")
    assert _rewards(*specs).names == ("regex", "json", "regex_2", "json_2", "length", "regex_3")


def test_exact_strips_surrounding_whitespace_only():
    completions = [" 42\n", "42", "42.0", "the answer is 42", "Yes"]
    _, scores = _score(["exact"], completions, reference=["42", "42 ", "42", "42", "yes"])
    assert scores["exact"].tolist() == [1, 1, 0, 0, 0]


def test_exact_needs_a_reference():
    with pytest.raises(RewardError, match=r"reward exact: example 1 \(prompt 'prompt 1'\) has no reference"):
        _score(["exact"], ["a", "b"], reference=["a", None])
    with pytest.raises(RewardError, match="example 0 .* has no reference"):
        _score(["exact"], ["a"])


def test_regex_is_found_anywhere_unless_anchored():
    _, scores = _score(["regex:\\d+", "regex:^\\d+$"], ["abc 12", "12", "x"])
    assert scores["regex"].tolist() == [1, 1, 0]
    assert scores["regex_2"].tolist() == [0, 1, 0]


def test_json_is_validity_or_the_share_of_the_references_fields():
    right = {"customer": "Ann", "quantity": 3, "address": {"city": "Leeds", "zip": "LS1"}}
    completions = [
        json.dumps(right),
        json.dumps({**right, "quantity": "3", "extra": 1}),  # a field of another type is wrong; extra fields free
        json.dumps({**right, "address": {"city": "Leeds"}}),  # a nested value counts whole
        "{not json",
        json.dumps([1, 2]),  # valid JSON, not an object
        json.dumps([1, 2]),
    ]
    references = [REFERENCE] * 5 + ["plain text"]
    _, scores = _score(["json"], completions, reference=references)
    assert scores["json"].tolist() == pytest.approx([1, 2 / 3, 2 / 3, 0, 0, 1])
    _, without = _score(["json"], ["{}", "{", "3"])  # no reference column: validity alone
    assert without["json"].tolist() == [1, 0, 1]


def test_length_penalises_tokens_beyond_n_linearly_down_to_minus_one():
    _, scores = _score(["length:10"], ["x"] * 6, tokens=[0, 10, 11, 15, 20, 500])
    assert scores["length"].tolist() == [0, 0, -0.1, -0.5, -1, -1]


def test_the_total_is_the_weighted_sum_in_float64():
    total, scores = _score(
        ["exact=2", "regex:b=-0.5", "length:1=0"], ["a", "b", "ab"], tokens=[1, 1, 3], reference=["a", "b", "x"]
    )
    assert list(scores) == ["exact", "regex", "length"]
    assert all(s.dtype == np.float64 and s.shape == (3,) for s in scores.values())
    assert total.dtype == np.float64 and total.tolist() == [2.0, 1.5, -0.5]


def test_a_user_function_gets_prompts_completions_and_every_column_by_keyword(tmp_path):
    (tmp_path / "helpers.py").write_text("BONUS = 0.5\n")  # beside the reward file, importable from it
    (tmp_path / "mine.py").write_text(
        "from helpers import BONUS\n"
        "def trl_style(completions, **kwargs):\n"  # as TRL's reward functions are written
        "    completions.clear()\n"  # changing its arguments changes nothing of the run's
        "    return [BONUS] * len(kwargs['reference'])\n"
        "def mine(prompts, completions, reference, topic):\n"
        "    return [float(c == r) + len(p) / 100 + (t == 'math') for p, c, r, t in zip(prompts, completions, "
        "reference, topic)]\n"
    )
    rewards = _rewards(f"{tmp_path}/mine.py:trl_style", f"{tmp_path}/mine.py:mine=2")
    assert rewards.names == ("trl_style", "mine")
    completions = ["4", "5"]
    total, scores = rewards(["2+2?", "2+3?"], completions, {"reference": ["4", "6"], "topic": ["math", "x"]}, [1, 1])
    assert completions == ["4", "5"]
    assert scores["trl_style"].tolist() == [0.5, 0.5]
    assert scores["mine"].tolist() == pytest.approx([2.04, 0.04])
    assert total.tolist() == pytest.approx([4.58, 0.58])


BAD = {
    "raises on one example": (
        "    return [1 / (c != 'boom') for c in completions]\n",
        "reward bad.py:score raised ZeroDivisionError: division by zero, on example 2 (prompt 'Extract the order",
    ),
    "raises on the batch only": (
        "    assert len(completions) == 1, 'one at a time'\n    return [0.0]\n",
        "reward bad.py:score raised AssertionError: one at a time, on the batch of 4 (on none alone)",
    ),
    "wrong length": ("    return [1.0]\n", "bad.py:score returned 1 scores for 4 completions: expected one each"),
    "NaN": (
        "    return [float('nan') if c == 'boom' else 1.0 for c in completions]\n",
        "reward bad.py:score returned nan for example 2 (prompt 'Extract the order from this long message…'): a reward "
        "must be a finite number",
    ),
    "infinity": ("    return [0, 1, 2, float('-inf')]\n", "returned -inf for example 3 (prompt 'four')"),
    "text": ("    return ['1'] * 4\n", "returned '1' for example 0 (prompt 'one'): a reward must be a finite number"),
    "None": ("    return [1, None, 1, 1]\n", "returned None for example 1"),
    "not a list": ("    return 1.0\n", "bad.py:score returned 1.0: expected a list of one number per completion"),
    "a string": ("    return 'good'\n", "returned 'good': expected a list of one number per completion"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_failing_reward_names_itself_and_the_first_bad_example(case, tmp_path):
    body, message = BAD[case]
    (tmp_path / "bad.py").write_text(f"def score(prompts, completions, **columns):\n{body}")
    rewards = _rewards("exact", f"{tmp_path}/bad.py:score")
    prompts = ["one", "two", "Extract the order from this long message\n please, it is long", "four"]
    with pytest.raises(RewardError) as e:
        rewards(prompts, ["a", "b", "boom", "d"], {"reference": list("abcd")}, [1] * 4)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_arrays_and_true_false_are_numbers(tmp_path):
    (tmp_path / "ok.py").write_text(
        "import numpy as np\n"
        "def array(completions, **kw):\n    return np.array([0.5] * len(completions), dtype=np.float32)\n"
        "def flags(completions, **kw):\n    return [c.startswith('{') for c in completions]\n"
    )
    total, _ = _score([f"{tmp_path}/ok.py:array", f"{tmp_path}/ok.py:flags"], ["{}", "x"])
    assert total.tolist() == [1.5, 0.5]


@pytest.mark.parametrize(
    "source, message",
    [
        ("import no_such_module_here\ndef score(**kw): pass\n", "importing {path} failed: ModuleNotFoundError"),
        ("score = 3\n", "score in {path} is not a function"),
        ("def score(**kw): pass\nraise RuntimeError('no data')\n", "failed: RuntimeError: no data"),
    ],
)
def test_a_reward_file_that_cannot_be_used_is_one_line(source, message, tmp_path):
    path = tmp_path / "r.py"
    path.write_text(source)
    with pytest.raises(RewardError) as e:
        _rewards(f"{path}:score")
    assert str(e.value).startswith("reward r.py:score: ") and message.format(path=path) in str(e.value)


def test_check_rewards_scores_the_references_before_any_generation(tmp_path):
    rewards = _rewards("exact", "json", "length:4=-1")
    prompts = ["p0", "p1", "p2"]
    means = check_rewards(rewards, prompts, {"reference": [REFERENCE, "text", REFERENCE]})
    assert means == {"exact": 1.0, "json": pytest.approx(2 / 3), "length": 0.0}
    with pytest.raises(RewardError, match=r"reward exact: example 0 \(prompt 'p0'\) has no reference"):
        check_rewards(rewards, prompts, {"topic": ["a", "b", "c"]})  # prompt-only rows, a reward that needs answers
    (tmp_path / "needs.py").write_text("def score(completions, level, **kw):\n    return [1.0] * len(completions)\n")
    with pytest.raises(RewardError, match="needs.py:score raised TypeError: .*'level'"):
        check_rewards(_rewards(f"{tmp_path}/needs.py:score"), prompts, {"reference": ["a", "b", "c"]})


def test_functions_written_for_trl_score_as_in_trls_grpo_trainer(tiny_model, tmp_path):
    """The same functions, weights and rows: each function's scores equal TRL 1.16 GRPOTrainer's, and the total is
    their sum weighted by TRL's reward_weights."""
    import runpy

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    path = tmp_path / "trl_rewards.py"
    path.write_text(
        "def trl_style(completions, **kwargs):\n    return [len(c) / 10 for c in completions]\n"
        "def with_columns(prompts, completions, reference, topic, **kwargs):\n"
        "    return [float(c == r) + (t == 'math') + len(p) / 100 for p, c, r, t in zip(prompts, completions, "
        "reference, topic)]\n"
    )
    functions = runpy.run_path(str(path))
    trainer = GRPOTrainer(
        model=tiny_model,
        reward_funcs=[functions["trl_style"], functions["with_columns"]],
        args=GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                        reward_weights=[2.0, -0.5], per_device_train_batch_size=4, num_generations=2),
        train_dataset=Dataset.from_list([{"prompt": "2+2?"}, {"prompt": "hi"}]),
    )  # fmt: skip
    rows = [{"prompt": "2+2?", "reference": "4", "topic": "math"}] * 2 + [{"prompt": "hi", "reference": "hello"}] * 2
    rows = [{"topic": "x", **row} for row in rows]
    prompts, completions = [r["prompt"] for r in rows], ["4", "5", "hello", "hey there"]
    theirs = trainer._calculate_rewards(rows, prompts, completions, [[0]] * len(rows))  # [completions, functions]

    ours = _rewards(f"{path}:trl_style=2", f"{path}:with_columns=-0.5")
    columns = {k: [r[k] for r in rows] for k in ("reference", "topic")}
    total, scores = ours(prompts, completions, columns, [1] * len(rows))
    assert np.stack([scores["trl_style"], scores["with_columns"]], axis=1) == pytest.approx(theirs.double().numpy())
    assert total == pytest.approx((theirs * trainer.reward_weights).sum(dim=1).double().numpy())
    assert theirs.dtype == torch.float32 and total.dtype == np.float64  # TRL scores in fp32, loratune in fp64

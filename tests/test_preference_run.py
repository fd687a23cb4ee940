"""A finished preference run through the other commands: `eval` on pairs, `data inspect` of pairs, and `generate`,
`chat`, `merge` and `export --format gguf` unchanged (one DPO run trained once per session, `tiny_dpo_run`)."""

import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import pair_rows, write_jsonl

from loratune.cli import main


def _events(run, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def _last_validation(run) -> dict:
    return _events(run, "eval")[-1]


def _steps(run) -> list[dict]:
    return _events(run, "train")


def test_eval_gives_the_runs_validation_numbers_and_the_reference_for_the_base(tiny_dpo_run, tmp_path, capsys):
    val, last = tiny_dpo_run.parent / "val.jsonl", _last_validation(tiny_dpo_run)
    eval_last = ["eval", str(tiny_dpo_run / "last"), "--data", str(val), "--report", str(tmp_path / "r")]
    # one pair a pass (training validated 4 a pass): the same means
    assert main([*eval_last, "--json", "--batch-size", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["unit"], summary["pairs"], summary["objective"]) == ("pairs", 4, "dpo")
    # the last adapter on the validation file: the numbers of the run's last validation (step 6)
    tuned = summary["fine_tuned"]
    for name in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_logp"):
        assert tuned[name] == pytest.approx(last[f"val_{name}"], rel=1e-5, abs=1e-7), name
    assert tuned["reward_margin"] != 0
    # the base model is the reference: every pair's loss is log 2, its rewards 0
    base = summary["base"]
    assert base["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert base["chosen_reward"] == base["rejected_reward"] == base["reward_accuracy"] == 0
    assert base["chosen_logp"] == pytest.approx(tuned["chosen_logp"] - tuned["chosen_reward"] / 0.1, rel=1e-4)
    assert json.loads((tmp_path / "r").read_text()) | {"report": str(tmp_path / "r")} == summary

    assert main(eval_last) == 0
    out = capsys.readouterr().out
    assert f"{val}: 4 pairs, objective dpo (base model: the reference)" in out
    assert "reward accuracy" in out and f"{100 * tuned['reward_accuracy']:.1f}%" in out

    assert main(["eval", str(tiny_dpo_run), "--data", str(val), "--generate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --generate: ") and len(err.splitlines()) == 1


def test_data_inspect_of_pairs_says_what_training_truncates_and_drops(tiny_model, tmp_path, capsys):
    from loratune import TrainConfig
    from loratune.data.encode import encoder_for
    from loratune.data.prepare import prepare
    from loratune.modeling.model import load_tokenizer

    long = {"prompt": "order " * 60, "chosen": "mugs", "rejected": "lamps"}  # its prompt is cut from the left
    too_long = {"prompt": "hi", "chosen": "order " * 80, "rejected": "no"}  # its chosen answer alone is too long
    data = write_jsonl(tmp_path / "pairs.jsonl", [*pair_rows(12), long, too_long])
    flags = ["--model", tiny_model, "--objective", "dpo", "--train-data", data, "--max-length", "64"]
    assert main(["data", "inspect", *flags, "--json"]) == 0
    ins = json.loads(capsys.readouterr().out)
    cfg = TrainConfig(model=tiny_model, objective="dpo", train_data=data, max_length=64)
    trained = prepare(cfg, encoder_for(load_tokenizer(tiny_model), cfg)).report
    assert ins["current"]["fit"]["truncated"] == trained.truncated > 1
    assert ins["current"]["fit"]["dropped_too_long"] == trained.dropped_too_long == 1
    assert ins["current"]["fit"]["first_too_long"].endswith("pairs.jsonl line 14")
    assert ins["answers"]["chosen"]["max"] == ins["target"]["max"] > 64  # the dropped pair's answer, whole
    recommended = ins["at_recommended"]  # 99% of 14 pairs: all of them fit
    assert recommended["whole"] == 14 and recommended["fit"]["truncated"] == recommended["fit"]["dropped_too_long"] == 0

    assert main(["data", "inspect", *flags]) == 0
    out = capsys.readouterr().out
    assert "data: 14 rows (pairs): 13 training + 1 validation pairs" in out
    assert all(f"\n  {row} " in out for row in ("prompt", "chosen", "rejected", "total (longest)"))
    assert f"{ins['current']['whole']} of 14 pairs whole" in out and "1 dropped as too long" in out


def test_generate_chat_merge_and_export_work_on_a_dpo_run(tiny_dpo_run, tmp_path, capsys):
    from loratune.inference.chat import chat
    from loratune.inference.export import export_gguf
    from loratune.inference.merge import merged_model
    from loratune.inference.run import load_run, text_prompt
    from loratune.modeling.generate import generate_texts

    run = load_run(tiny_dpo_run)
    prompt = "send two lamps to leeds"
    ids = run.encoder.prompt_ids(text_prompt(prompt, run.data_format))
    assert ids[-3:] == run.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids[-3:]
    expected = generate_texts(run.model, run.tokenizer, [ids], run.encoder.end_ids, 12)[0]
    assert main(["generate", str(tiny_dpo_run), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", pair_rows(2))  # the run's own pair rows: their prompts
    assert main(["generate", str(tiny_dpo_run), "--file", prompts, "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2

    said = io.StringIO()
    chat(tiny_dpo_run, max_new_tokens=12, stdin=io.StringIO(f"{prompt}\n/exit\n"), stdout=said)
    assert said.getvalue().strip() == expected.strip()

    merged = merged_model(tiny_dpo_run, dtype=torch.float32).model
    with torch.no_grad():
        tuned = run.model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(merged(torch.tensor([ids])).logits[0], tuned, atol=1e-4, rtol=1e-4)
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(tiny_dpo_run, tmp_path / "dpo.gguf", "bf16").path
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False, seed=0)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(got - tuned.numpy()).max() < 0.02 * np.abs(tuned.numpy()).max()


@pytest.mark.parametrize("text", [True, False])
def test_generation_formats_a_preference_runs_prompts_as_training_did(tiny_model, tmp_path, text):
    """Text pairs are raw text, pairs of turns go through the chat template: data.json says which, and a prompt
    row (here the pair rows themselves) gets the prompt tokens training gave the pair."""
    from dataclasses import asdict

    from loratune import TrainConfig
    from loratune.data.encode import encoder_for
    from loratune.data.prepare import prepare
    from loratune.inference.run import prompt_examples, trained_format
    from loratune.modeling.model import load_tokenizer

    rows = [{"prompt": f"{i}: send mugs to", "chosen": " leeds", "rejected": " york"} for i in range(3)]
    rows = rows if text else pair_rows(3)
    cfg = TrainConfig(model=tiny_model, objective="dpo", train_data=write_jsonl(tmp_path / "p.jsonl", rows),
                      val_ratio=0)  # fmt: skip
    encoder = encoder_for(load_tokenizer(tiny_model), cfg)
    data = prepare(cfg, encoder)
    (tmp_path / "data.json").write_text(json.dumps(asdict(data.report)))
    fmt = trained_format(tmp_path, cfg)
    assert fmt == ("prompt_completion" if text else "messages")
    prompts = [encoder.prompt_ids(ex) for ex in prompt_examples(cfg.train_data, fmt, {})]
    assert prompts == [pair.prompt for pair in data.train.items]


def test_a_dpo_run_on_top_of_an_sft_run_and_its_adapter_on_that_runs_model(
    tiny_model, tiny_plain_model, tiny_run, tmp_path, capsys
):
    """reference: RUN: the SFT run's model is the starting point and the reference, in training and when the run is
    loaded; the adapter loads with PEFT on the SFT run's merged model, or stacked on the SFT run's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratune import TrainConfig, train
    from loratune.inference.evaluate import evaluate_run
    from loratune.inference.merge import merge
    from loratune.inference.run import load_run

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    settings = dict(model=tiny_model, objective="dpo", train_data=data, val_ratio=0, epochs=1, batch_size=4,
                    gradient_accumulation_steps=2, precision="fp32", device="cpu", learning_rate=1e-3,
                    max_length=256)  # fmt: skip
    train(TrainConfig(**settings, reference=str(tiny_run), output_dir=str(tmp_path / "dpo")))
    train(TrainConfig(**settings, output_dir=str(tmp_path / "plain")))
    step, plain = (_steps(tmp_path / run)[0] for run in ("dpo", "plain"))
    assert step["loss"] == pytest.approx(math.log(2), rel=1e-6)

    # its base (adapter off) is the SFT run's model: in training's first step (the adapter at zero) and when loaded
    dpo = load_run(tmp_path / "dpo")
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_run / "adapter").eval()
    ids = torch.tensor([dpo.tokenizer("send two lamps to leeds").input_ids])
    with torch.no_grad(), dpo.model.disable_adapter():
        torch.testing.assert_close(dpo.model(ids).logits, sft(ids).logits, atol=1e-5, rtol=1e-5)
    base = evaluate_run(tmp_path / "dpo", data, report=tmp_path / "r.jsonl")["base"]
    assert base["chosen_logp"] == pytest.approx(step["chosen_logp"], rel=1e-5)
    assert abs(step["chosen_logp"] - plain["chosen_logp"]) > 0.01 * abs(plain["chosen_logp"])

    with torch.no_grad():
        tuned = dpo.model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merge(tiny_run, tmp_path / "sft-merged"))
        on_merged = PeftModel.from_pretrained(merged, tmp_path / "dpo" / "adapter").eval()
        torch.testing.assert_close(on_merged(ids).logits, tuned, atol=1e-5, rtol=1e-5)
        stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_run / "adapter",
                                            adapter_name="sft")  # fmt: skip
        stacked.load_adapter(tmp_path / "dpo" / "adapter", adapter_name="dpo")
        stacked.base_model.set_adapter(["sft", "dpo"])
        torch.testing.assert_close(stacked.eval()(ids).logits, tuned, atol=1e-5, rtol=1e-5)

    for model, reference, said in ((tiny_model, tmp_path, "not a loratune run folder (no config.yaml)"),
                                   (tiny_plain_model, tiny_run, "that run's adapter is for model")):  # fmt: skip
        flags = ["--model", model, "--objective", "dpo", "--train-data", data, "--reference", str(reference)]
        assert main(["train", *flags, "--output-dir", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: reference = ") and said in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
    assert main(["export", str(tmp_path / "dpo"), "--format", "gguf", "--adapter-only"]) == 2
    assert "trained on top of" in capsys.readouterr().err

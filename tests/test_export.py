import shutil
from pathlib import Path

import pytest
import torch
import yaml

from loratune.core.errors import UserError
from loratune.inference.merge import merge


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_model_reloads_with_plain_transformers_and_matches(tiny_model, tiny_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merge(tiny_run, tmp_path / "default")  # the tiny base is stored in fp32, so this is fp32
    merge(tiny_run, tmp_path / "bf16", dtype="bf16")

    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "adapter")
    ids = tokenizer("send 3 blue lamps to leeds by friday please", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trained = PeftModel.from_pretrained(base, tiny_run / "adapter").eval()
    expected = _logits(trained, ids)
    with trained.disable_adapter():
        untrained = _logits(trained, ids)
    assert (untrained - expected).abs().max() > 0.05  # the adapter matters, so matching it means something

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "default")
    assert merged.dtype == torch.float32
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-5)
    merged16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert merged16.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(merged16, ids), expected, atol=0.05, rtol=0.02)

    saved = AutoTokenizer.from_pretrained(tmp_path / "default")
    assert saved.chat_template == tokenizer.chat_template and saved.get_vocab() == tokenizer.get_vocab()
    ends = merged.generation_config.eos_token_id
    assert tokenizer.eos_token_id in (ends if isinstance(ends, list) else [ends])
    assert not list((tmp_path / "default").glob("adapter_*"))


def test_merge_refuses_to_overwrite_and_to_merge_into_4bit_silently(tiny_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        merge(tiny_run, tmp_path / "taken")
    for not_a_merge in (tmp_path / "taken", tiny_run):  # --overwrite replaces only merge's own output
        with pytest.raises(UserError, match="holds files loratune did not write"):
            merge(tiny_run, not_a_merge, overwrite=True)
    assert (tmp_path / "taken" / "file").is_file() and (Path(tiny_run) / "adapter").is_dir()
    merged = merge(tiny_run, tmp_path / "merged")
    (merged / "stale").write_text("x")
    merge(tiny_run, merged, overwrite=True)
    assert not (merged / "stale").exists() and (merged / "config.json").is_file()

    run = tmp_path / "qlora"
    shutil.copytree(tiny_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "load_in_4bit": True}))
    if torch.cuda.is_available():
        pytest.skip("this checks the message where 4-bit weights cannot be dequantised")
    with pytest.raises(UserError, match="trained in 4-bit .*dequantised"):
        merge(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()

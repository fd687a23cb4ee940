import json

import torch

from loratune.core import device


def test_the_bf16_speed_is_remembered_per_instruction_set(tmp_path, monkeypatch):
    """Two CPUs of one model name ("AMD EPYC"), one with AVX-512 BF16 and one with AVX2 only, are measured apart."""
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path))
    measure = device.cpu_bf16_speedup.__wrapped__  # the uncached function: each call reads the file on disk

    monkeypatch.setattr(device, "cpu_bf16_features", lambda: ["avx2", "avx512f", "avx512_bf16"])
    monkeypatch.setattr(device, "_matmul_seconds", lambda dtype: 0.5 if dtype == torch.bfloat16 else 1.0)
    assert measure() == 2.0
    monkeypatch.setattr(device, "cpu_bf16_features", lambda: ["avx2"])
    monkeypatch.setattr(device, "_matmul_seconds", lambda dtype: 100.0 if dtype == torch.bfloat16 else 1.0)
    assert measure() == 0.01
    assert len(json.loads((tmp_path / "cpu-bf16.json").read_text())) == 2

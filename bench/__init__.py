"""Benchmark of loratune against HF Trainer + PEFT and TRL SFTTrainer + PEFT (python -m bench)."""

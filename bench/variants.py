"""Each LoRA variant on the built-in model and the quickstart task, end to end: training speed and peak, the plan
against that peak, the merged model against the trained one, and llama.cpp's answers from the GGUF files.

    python -m bench.variants                      # every variant, 8 steps each (fp32 base)
    python -m bench.variants --variants dora,pissa --steps 4
    python -m bench.variants --model tiny         # a random Llama (hidden 256, 4 layers): minutes, not hours

Each run is `loratune train --preset quickstart` in a process of its own (its summary.json peak is the process's),
fp32, no test set during training. Then, in this process: `loratune plan`'s total for the same settings; the
merged model's logits on held-out prompts against the trained model rebuilt from the last checkpoint (base,
the variant's initialisation, the checkpoint's weights); the merged f16 GGUF, and where llama.cpp can hold the
adapter the adapter-only GGUF on an f16 GGUF of the base, answering held-out prompts greedily in llama.cpp
against transformers' greedy answers from the merged fp32 model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from loratune.core.presets import PRESETS

VARIANTS = {
    "lora": [],
    "rslora": ["--use-rslora", "--lora-alpha", "8"],  # scale 8 / sqrt(8), the Guide's 2x-4x restated
    "dora": ["--use-dora"],
    "pissa": ["--lora-init", "pissa"],
    "olora": ["--lora-init", "olora"],
    "loraplus": ["--loraplus-lr-ratio", "16"],
    "modules_to_save": ["--modules-to-save", "lm_head"],
}


def train(root: Path, name: str, steps: int, model: str) -> Path:
    run = root / name
    flags = ["--preset", "quickstart", "--model", model, "--precision", "fp32", "--max-steps", str(steps),
             "--eval-every-steps", str(steps), "--output-dir", str(run), "--test-data", ""]  # fmt: skip
    subprocess.run([sys.executable, "-m", "loratune", "train", *flags, *VARIANTS[name]], check=True)
    return run


def merge_difference(run: Path, cfg, steps: int, prompts: list[list[int]]) -> float:
    """Largest |logit| difference between the merged fp32 model and the trained model on the prompts."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from loratune.inference.merge import merged_model
    from loratune.modeling.adapter import add_lora
    from loratune.modeling.model import load_model, resolve_model

    trained = add_lora(load_model(resolve_model(cfg.model), torch.float32, torch.device("cpu")), cfg)
    saved = run / "checkpoints" / f"step-{steps:06d}" / "adapter" / "adapter_model.safetensors"
    set_peft_model_state_dict(trained, load_file(saved))
    merged = merged_model(run, "last", torch.float32).model
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            worst = max(worst, (trained.eval()(input_ids=x).logits - merged(input_ids=x).logits).abs().max().item())
    return worst


def llama_answers(path: Path, prompts: list[list[int]], budget: int, tokenizer, lora: Path | None = None) -> list:
    import llama_cpp

    options = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, verbose=False, seed=0, **options)
    try:
        out = [llm.create_completion(p, max_tokens=budget, temperature=0.0)["choices"][0]["text"] for p in prompts]
    finally:
        llm.close()
    return [text.strip() for text in out]


def measure(root: Path, name: str, args, base_gguf: Path | None) -> tuple[dict, Path | None]:
    from loratune.commands.plan import plan_run
    from loratune.core.errors import UserError
    from loratune.core.sources import read_run_config
    from loratune.data.prepare import read_examples
    from loratune.inference.export import export_gguf
    from loratune.inference.run import load_run
    from loratune.modeling.generate import generate_texts

    steps = args.steps
    run = train(root, name, steps, args.model)
    summary = json.loads((run / "summary.json").read_text())
    cfg = read_run_config(run)
    planned = plan_run(cfg).total
    loaded = load_run(run, "last")
    loaded.model.float()
    examples = read_examples(PRESETS["quickstart"].values["test_data"], "test", cfg)[: args.prompts]
    prompts = [loaded.encoder.prompt_ids(ex) for ex in examples]
    budget = 48
    expected = [t.strip() for t in generate_texts(loaded.model, loaded.tokenizer, prompts, loaded.encoder.end_ids,
                                                   budget)]  # fmt: skip
    row = {
        "variant": name,
        "tokens/s": summary["tokens_per_s"],
        "peak RSS GiB": summary["peak_memory_bytes"] / 2**30,
        "plan / measured": planned / summary["peak_memory_bytes"],
        "merge max diff": merge_difference(run, cfg, steps, prompts),
    }
    merged = export_gguf(run, root / f"{name}-f16.gguf").path
    row["merged GGUF same answers"] = sum(
        a == b for a, b in zip(llama_answers(merged, prompts, budget, loaded.tokenizer), expected)
    )
    try:
        adapter = export_gguf(run, root / f"{name}-adapter.gguf", adapter_only=True).path
    except UserError as e:
        row["adapter GGUF same answers"] = f"refused: {str(e).split('; ')[0].split(': ', 1)[1]}"
    else:
        if base_gguf is None:  # the base alone: this run with its B matrices zeroed, merged
            base_gguf = zeroed_base(run, root)
        answers = llama_answers(base_gguf, prompts, budget, loaded.tokenizer, lora=adapter)
        row["adapter GGUF same answers"] = sum(a == b for a, b in zip(answers, expected))
    row["prompts"] = len(prompts)
    merged.unlink()
    return row, base_gguf


def zeroed_base(run: Path, root: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from loratune.inference.export import export_gguf

    copy = root / "base-run"
    shutil.copytree(run, copy)
    weights = copy / "last" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in load_file(weights).items()}, weights)
    return export_gguf(copy, root / "base-f16.gguf", adapter="last").path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m", help="a model, or tiny")
    args = parser.parse_args()
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            from loratune.modeling.tiny import make_tiny_model

            args.model = str(make_tiny_model(Path(tmp) / "tiny", hidden_size=256, layers=4, vocab_size=1024))
        for name in args.variants.split(","):
            row, base = measure(Path(tmp), name, args, base)
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()

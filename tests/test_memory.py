import json
import re

import pytest
import torch
from conftest import assert_plan_is_run, varied_rows, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from bench.measure import measure_pass
from loratune import TrainConfig
from loratune.cli import main
from loratune.core.errors import UserError
from loratune.data.plan import plan_for
from loratune.memory.arithmetic import NF4_BYTES, MemoryModel
from loratune.memory.guard import RunMemory
from loratune.memory.planner import Budget, choose_batch_size, estimate, fixes, largest_pass, refusal
from loratune.memory.shape import read_shape, shape_from_config
from loratune.memory.throughput import STEP_SHARE, measured_throughput
from loratune.modeling.adapter import add_lora
from loratune.modeling.model import load_model

ACCURACY = (
    0.05  # the issue asks 25% on CPU; the estimate is within 2% here (docs/memory-accuracy.md), so 5% catches drift
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests count bytes, not speed: one thread spares them OpenMP's waits on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(hidden=64, intermediate=192, layers=2, heads=4, kv_heads=2, vocab=1000, tied=False):
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
    )


def test_parameter_gradient_and_optimizer_bytes_are_exact():
    """A known config, counted by hand, and the same model built for real after one AdamW step."""
    config = _llama(intermediate=256, vocab=512)
    cfg = TrainConfig(lora_r=8)
    mm = MemoryModel.for_run(cfg, shape_from_config(config, cfg), "cpu", torch.float32)
    # LoRA per block, r x in + out x r: q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->256, down 256->64
    lora = 2 * sum(8 * i + o * 8 for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 256), (64, 256), (256, 64)])
    assert lora == 22528
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 256)
    other = 2 * 512 * 64 + 2 * 2 * 64 + 64  # embeddings, output layer, two norms per block, final norm
    assert mm.static_bytes() == {
        "frozen weights (fp32)": 4 * (linear + other),
        "LoRA weights (fp32)": 4 * lora,
        "LoRA gradients (fp32)": 4 * lora,
        "AdamW state (2 x fp32)": 8 * lora,
    }
    four_bit = MemoryModel.for_run(cfg.model_copy(update={"load_in_4bit": True}), mm.shape, "cuda", torch.bfloat16)
    assert four_bit.static_bytes()["frozen weights (4-bit NF4 linear layers + bf16)"] == int(
        linear * NF4_BYTES + 2 * other
    )

    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(config), cfg)
    ids = torch.randint(0, 512, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    optimizer.step()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.requires_grad)
    moments = sum(
        s[k].numel() * s[k].element_size() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")
    )
    assert (frozen, grads, moments) == (4 * (linear + other), 4 * lora, 8 * lora)


def test_tied_embeddings_are_counted_once():
    cfg = TrainConfig()
    untied, tied = (shape_from_config(_llama(tied=t), cfg) for t in (False, True))
    assert untied.other_params - tied.other_params == 1000 * 64
    assert untied.block_linear_params == tied.block_linear_params


CASES = {  # name: (model config, lengths, share of each example's tokens with loss, settings)
    "tiny packed": (_llama(), [100, 200, 50], 1.0, {}),
    "long answers: two loss chunks": (_llama(vocab=8000), [1500, 1500, 1200], 1.0, {}),
    "small vocabulary: the backward pass sets the peak": (
        _llama(hidden=128, intermediate=512, vocab=100),
        [1000],
        1.0,
        {},
    ),
    "short answers, no dropout": (
        _llama(hidden=128, intermediate=512, vocab=200),
        [600, 300],
        0.3,
        {"lora_dropout": 0.0},
    ),
    "LoRA on q and v only": (_llama(), [200, 150], 1.0, {"lora_target_modules": "q_proj,v_proj"}),
    "checkpointing": (_llama(layers=3), [300, 200], 1.0, {"gradient_checkpointing": True}),
    "padded": (_llama(), [300, 250, 10, 100], 1.0, {"packing": False}),
    "bf16 base": (_llama(), [200, 150], 1.0, {"precision": "bf16"}),
    "smollm2-135m shape, 2 blocks": (
        _llama(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=True),
        [300, 212],
        0.5,
        {},
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_estimate_matches_measured_peak_on_cpu(name):
    """One pass's estimated activations + working memory against the CPU allocator's measured peak increase."""
    config, lengths, answer_share, settings = CASES[name]
    cfg = TrainConfig(**settings)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype)
    base.config.use_cache = False
    measured, batch = measure_pass(base, cfg, lengths, answer_share)
    estimated = MemoryModel.for_run(cfg, shape_from_config(config, cfg), "cpu", dtype).batch_bytes(batch)
    assert abs(estimated - measured) <= ACCURACY * measured, (estimated, measured)


def _tiny_data(tiny_model, tmp_path, rows=64):
    from loratune.data.encode import Encoder, choose_template
    from loratune.data.prepare import prepare
    from loratune.modeling.model import load_tokenizer

    cfg = TrainConfig(
        model=tiny_model,
        train_data=write_jsonl(tmp_path / "train.jsonl", varied_rows(rows)),
        val_ratio=0.1,
        max_length=256,
        precision="fp32",
        device="cpu",
    )
    tokenizer = load_tokenizer(tiny_model)
    train = prepare(cfg, Encoder(tokenizer, choose_template(tokenizer, None), False)).train
    return cfg, train.lengths, train.target_counts


def test_auto_batch_size_keeps_the_effective_batch_under_a_cap(tiny_model, tmp_path):
    cfg, lengths, targets = _tiny_data(tiny_model, tmp_path)
    cfg = cfg.model_copy(update={"batch_size": "auto", "gradient_accumulation_steps": 8})
    mm = MemoryModel.for_run(cfg, read_shape(tiny_model, cfg), "cpu", torch.float32)
    static = sum(mm.static_bytes().values())

    plan = plan_for(cfg, lengths, targets, packing=True)

    def peak(b):
        size = largest_pass(mm, plan.with_micro_batch(b))
        return static + mm.pass_bytes(size.tokens, size.targets).total

    cap = (peak(8) + peak(16)) // 2  # 8 fits, 16 does not
    choice = choose_batch_size(mm, plan, Budget(cap, "test cap"), cfg)
    assert (choice.batch_size, choice.gradient_accumulation_steps) == (8, 8)
    assert choice.peak <= cap and "effective batch 64" in choice.reason and "batch_size 16 would need" in choice.reason
    assert set(choice.largest.examples) <= set(range(len(lengths)))
    with pytest.raises(UserError, match="even batch_size 1 needs.*gradient_checkpointing: true"):
        choose_batch_size(mm, plan, Budget(static + 1000, "test cap"), cfg)


def test_fixes_make_a_plan_fit(tiny_model, tmp_path):
    cfg, lengths, targets = _tiny_data(tiny_model, tmp_path)
    shape = read_shape(tiny_model, cfg)
    mm = MemoryModel.for_run(cfg, shape, "cpu", torch.float32)
    plan = plan_for(cfg, lengths, targets, packing=True)
    fits = estimate(cfg, mm, plan, Budget(2**40, "plenty"), from_data=True)
    assert fits.fits and not fits.fixes and fits.total == sum(fits.items.values())
    with_checkpointing = fits.total_by_checkpointing["on"]
    assert with_checkpointing < fits.total_by_checkpointing["off"] == fits.total
    budget = Budget((with_checkpointing + fits.total) // 2, "test cap")
    tight = estimate(cfg, mm, plan, budget, from_data=True)
    assert not tight.fits
    assert tight.fixes[0].startswith("gradient_checkpointing: true") and "fits" in tight.fixes[0]
    assert any(f.startswith("batch_size ") and "same effective batch 64" in f for f in tight.fixes)
    assert tight.fixes == fixes(mm, plan, budget, cfg, from_data=True)
    assert re.search("more than test cap.*change one of: gradient_checkpointing: true", refusal(tight))


def test_plan_cli_on_a_tiny_model(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", varied_rows(40))
    args = [
        "plan",
        "--model",
        tiny_model,
        "--train-data",
        data,
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--max-length",
        "256",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"event": "train", "step": s, "tokens_per_s": r}) + "\n"
            for s, r in [(1, 5.0), (2, 100.0), (3, 120.0), (4, 110.0)]
        )
    )
    assert main([*args, "--max-memory", "1MB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["budget"] == 2**20 and plan["fixes"]
    assert plan["tokens_per_second"] == 110.0 and plan["epoch_seconds"] == pytest.approx(plan["epoch_tokens"] / 110.0)
    assert main([*args, "--tokens-per-second", "1000"]) == 0
    text = capsys.readouterr().out
    for item in (
        "frozen weights (fp32)",
        "LoRA gradients",
        "AdamW state",
        "activations, largest pass",
        "total",
        "fits",
        "with gradient checkpointing",
        "trainable:",
        "time per epoch: about",
    ):
        assert item in text
    assert "likely" not in text  # a given (or measured) throughput is quoted as it is


def test_a_benchmarked_time_is_a_range_around_its_estimate(tiny_model, tmp_path, capsys):
    """Without a measured or given throughput the time comes from the matrix-product benchmark, which a whole
    step reaches only a share of: the plan quotes the middle of that share and shows the range."""
    data = write_jsonl(tmp_path / "train.jsonl", varied_rows(24))
    args = ["plan", "--model", tiny_model, "--train-data", data, "--device", "cpu", "--output-dir", str(tmp_path)]
    assert main([*args, "--precision", "fp32", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    shortest, longest = plan["epoch_seconds_range"]
    low, middle, high = STEP_SHARE
    assert shortest == pytest.approx(plan["epoch_seconds"] * middle / high)
    assert longest == pytest.approx(plan["epoch_seconds"] * middle / low)
    assert main([*args, "--precision", "fp32"]) == 0
    assert ", likely " in capsys.readouterr().out


def test_data_inspect_shows_the_peak_per_max_length(tiny_model):
    from loratune.commands.inspect import memory_lines

    cfg = TrainConfig(model=tiny_model, device="cpu", precision="fp32")
    short, long = memory_lines(cfg, [128, 1024])
    assert short.startswith("estimated peak training memory at max_length=128: ")
    assert float(long.split(": ")[1].split()[0]) > float(short.split(": ")[1].split()[0])
    assert memory_lines(cfg.model_copy(update={"load_in_4bit": True}), [128])[0].startswith(
        "memory estimate unavailable: load_in_4bit = true: 4-bit loading (QLoRA) needs a CUDA GPU"
    )


def test_measured_throughput_skips_the_first_step(tmp_path):
    assert measured_throughput(TrainConfig(output_dir=str(tmp_path))) is None
    (tmp_path / "metrics.jsonl").write_text(
        '{"event": "train", "step": 1, "tokens_per_s": 1.0}\n'
        '{"event": "eval", "step": 1, "val_loss": 1.0}\n'
        '{"event": "train", "step": 2, "tokens_per_s": 50.0}\n'
    )
    assert measured_throughput(TrainConfig(output_dir=str(tmp_path))) == 50.0


def test_four_bit_is_refused_on_cpu(tiny_model, capsys):
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_model(tiny_model, torch.float32, torch.device("cpu"), load_in_4bit=True)
    assert main(["plan", "--model", tiny_model, "--device", "cpu", "--load-in-4bit"]) == 2
    assert "4-bit loading (QLoRA) needs a CUDA GPU" in capsys.readouterr().err
    # planning for a GPU that is not here is allowed, and counts the 4-bit base
    assert main(["plan", "--model", tiny_model, "--gpu-memory", "8GB", "--load-in-4bit"]) == 0
    assert "4-bit NF4" in capsys.readouterr().out


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_out_of_memory_and_auto_batch_under_a_cap_keep_the_effective_batch_and_the_result(
    tiny_model, tmp_path, monkeypatch
):
    """A pass over max_memory (simulated on CPU as a capped GPU would raise it) is replayed at half the micro-batch;
    batch_size auto under the same cap starts at a size that fits. Both give the uncapped run's adapter."""
    from loratune import train
    from loratune.data.encode import encoder_for
    from loratune.data.prepare import prepare
    from loratune.memory.planner import peak_items
    from loratune.modeling.model import load_tokenizer

    base = TrainConfig(
        model=tiny_model,
        train_data=write_jsonl(tmp_path / "train.jsonl", varied_rows(32)),
        val_data=write_jsonl(tmp_path / "val.jsonl", varied_rows(4, seed=1)),
        epochs=1,
        batch_size=8,
        gradient_accumulation_steps=2,
        lora_dropout=0.0,  # dropout masks depend on how a step is split
        max_length=256,
        precision="fp32",
        device="cpu",
        learning_rate=1e-3,
        early_stopping_patience=0,
    )
    reference = train(base.model_copy(update={"output_dir": str(tmp_path / "reference")}))
    assert reference["batch_size"] == 8
    assert_plan_is_run(base.model_copy(update={"output_dir": str(tmp_path / "reference")}), tmp_path / "reference")

    data = prepare(base, encoder_for(load_tokenizer(tiny_model), base)).train
    mm = MemoryModel.for_run(base, read_shape(tiny_model, base), "cpu", torch.float32)
    plenty = Budget(2**40, "plenty")

    plan = plan_for(base, data.lengths, data.target_counts, packing=True)

    def peak(b):
        return peak_items(mm, largest_pass(mm, plan.with_micro_batch(b)), plenty)[1]

    assert peak(2) < peak(8)
    cap = str((peak(2) + peak(8)) // 2)

    capped = base.model_copy(update={"output_dir": str(tmp_path / "capped"), "max_memory": cap})
    train(capped)
    events = [json.loads(line) for line in (tmp_path / "capped" / "metrics.jsonl").read_text().splitlines()]
    halvings = [e for e in events if e["event"] == "out_of_memory"]
    assert [e["batch_size"] for e in halvings] == [4, 2][: len(halvings)]  # the divisors of 16 below 8, in turn
    smaller = halvings[-1]["batch_size"]
    why = f"made smaller after running out of memory in step {halvings[-1]['step']}"
    assert_plan_is_run(
        capped, tmp_path / "capped", batch_size=smaller, gradient_accumulation_steps=16 // smaller, batch_size_from=why
    )
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, reference["steps"] + 1))

    auto_cfg = base.model_copy(update={"output_dir": str(tmp_path / "auto"), "max_memory": cap, "batch_size": "auto"})
    auto = train(auto_cfg)
    assert_plan_is_run(auto_cfg, tmp_path / "auto")
    assert auto["batch_size"] < 8 and auto["batch_size"] * auto["gradient_accumulation_steps"] == 16
    assert not any(
        json.loads(line)["event"] == "out_of_memory"
        for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()
    )

    # Out of memory in the step's second pass, after the first one's backward: its gradients must not count twice.
    calls = []

    def second_pass_fails(self, batch):
        calls.append(batch.input_ids.numel())
        if len(calls) == 2:
            raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(RunMemory, "raise_if_over", second_pass_fails)
    mid = train(base.model_copy(update={"output_dir": str(tmp_path / "mid_step")}))
    assert mid["batch_size"] == 4 and len(calls) > 2

    want = _adapter(tmp_path / "reference")
    for run in ("capped", "auto", "mid_step"):
        got = _adapter(tmp_path / run)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)

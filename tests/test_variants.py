"""PEFT's LoRA variants (rsLoRA, DoRA, PiSSA, OLoRA, LoRA+, modules_to_save): loratune's fused layer computes what
PEFT's layer computes, and what a run saves merges and exports to the model it trained."""

import json

import numpy as np
import pytest
import torch

from loratune.core.config import BASE_CHANGING_INITS, TrainConfig

# Each variant as its settings; dropout off so that two models compute the same thing.
VARIANTS = {
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "dora": {"use_dora": True},
    "pissa": {"lora_init": "pissa"},
    "pissa_fast": {"lora_init": "pissa_fast"},
    "olora": {"lora_init": "olora"},
    "gaussian": {"lora_init": "gaussian"},
    "modules_to_save": {"modules_to_save": ["embed_tokens", "lm_head"]},
}


def _model(path: str, cfg: TrainConfig, fused: bool):
    """The tiny model with cfg's adapters: as training builds it (fused), or with PEFT's own layer throughout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loratune.modeling.adapter import add_lora
    from loratune.modeling.variants import lora_options

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if fused:
        model = add_lora(base, cfg)
    else:
        options = lora_options(cfg)
        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear", **options)
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, config, autocast_adapter_dtype=True)
    torch.manual_seed(1)  # the same non-zero update in both (kaiming and gaussian start with B = 0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data += 0.1 * torch.randn_like(p)
    return model.train()


def _logits_and_grads(model, ids):
    logits = model(input_ids=ids).logits
    logits.backward(torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)))
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_layer_computes_each_variant_as_peft_does(variant, tiny_model):
    """Logits and every trained weight's gradient, fp32: the fused layer (PiSSA/OLoRA: on the base PEFT changed;
    rsLoRA: at PEFT's scale) equals PEFT's own LoRA layer within 1e-5 (gradients: of their largest element)."""
    from loratune.modeling.lora import FusedLoraLinear

    cfg = TrainConfig(lora_dropout=0.0, **VARIANTS[variant])
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, peft = _model(tiny_model, cfg, True), _model(tiny_model, cfg, False)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoraLinear) and ("default" in layer.lora_variant) == cfg.use_dora
    got, got_grads = _logits_and_grads(ours, ids)
    want, want_grads = _logits_and_grads(peft, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():  # within 1e-5 of the largest (summation order differs)
        want = want_grads[name]
        assert (grad - want).abs().max() <= 1e-5 * want.abs().max(), name
    if variant == "modules_to_save":
        assert any("embed_tokens.modules_to_save" in n for n in got_grads)


def test_the_start_says_which_layer_computes_dora_and_how_pissa_is_saved():
    from loratune.modeling.variants import variant_notes

    assert variant_notes(TrainConfig()) == []
    (dora,) = variant_notes(TrainConfig(use_dora=True))
    assert "PEFT's own LoRA layer computes DoRA" in dora
    (pissa,) = variant_notes(TrainConfig(lora_init="olora", lora_r=16))
    assert "plain LoRA of rank 32 (2 x lora_r) on the original base" in pissa


def test_loraplus_moves_b_ratio_times_as_far_as_a(tiny_model):
    """LoRA+: after the same first AdamW step (its size is the learning rate, whatever the gradient's), lora_B has
    moved loraplus_lr_ratio times as far as without LoRA+, and lora_A as far."""
    from loratune.modeling.variants import param_groups
    from loratune.training.setup import make_optimizer

    moved = {}
    for ratio in (1.0, 16.0):
        cfg = TrainConfig(lora_dropout=0.0, loraplus_lr_ratio=ratio, learning_rate=1e-4, warmup_ratio=0)
        model = _model(tiny_model, cfg, True)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer, _ = make_optimizer(cfg, param_groups(model, cfg), torch.device("cpu"), 10, 0)
        _logits_and_grads(model, torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0)))
        optimizer.step()
        moved[ratio] = {n: (p.detach() - before[n]).abs().max() for n, p in model.named_parameters() if p.requires_grad}
    for name, step in moved[16.0].items():
        expected = 16 * moved[1.0][name] if ".lora_B." in name else moved[1.0][name]
        torch.testing.assert_close(step, expected, rtol=1e-3, atol=0, msg=name)


def test_rslora_alpha_advice_is_in_terms_of_the_effective_scale():
    from loratune.core.presets import guide_warnings

    assert guide_warnings(TrainConfig(use_rslora=True, lora_r=16, lora_alpha=12)) == []  # 12 / 4 = 3
    (warning,) = guide_warnings(TrainConfig(use_rslora=True, lora_r=16, lora_alpha=32))  # 2x lora_r, scale 8
    assert "lora_alpha/sqrt(lora_r) = 8" in warning and "(2x-4x sqrt(lora_r) = 8-16 here)" in warning
    assert guide_warnings(TrainConfig(lora_r=16, lora_alpha=32)) == []


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"lora_init": "pissa", "objective": "dpo"}, "dpo compares with the base model (the adapter off)"),
        ({"lora_init": "olora", "objective": "grpo"}, "kaiming or gaussian, or grpo_beta 0"),
        ({"use_dora": True, "lora_init": "olora"}, "lora_init olora with use_dora is not supported"),
        ({"loraplus_lr_ratio": "0.5"}, "loraplus_lr_ratio = '0.5' (from --loraplus-lr-ratio): must be a number >= 1"),
        ({"lora_init": "loftq"}, "must be one of: kaiming, gaussian, pissa, pissa_fast, olora"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_in_one_line(settings, expected):
    from loratune.core.errors import UserError
    from loratune.core.sources import resolve

    with pytest.raises(UserError) as e:
        resolve(flags={k: str(v) for k, v in settings.items()})
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_modules_to_save_names_a_layer_of_the_model(tiny_model):
    from transformers import AutoModelForCausalLM

    from loratune.core.errors import UserError
    from loratune.modeling.adapter import add_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(UserError, match="modules_to_save = lm_hed: not a layer of the model; .* lm_head"):
        add_lora(base, TrainConfig(modules_to_save="embed_tokens,lm_hed"))


# --- A run of each variant: what it saves merges (and exports) to the model it trained ---------------------------

TRAINED = ("rslora", "dora", "pissa", "olora", "loraplus", "modules_to_save")
STEPS = 3
SHORT_ANSWERS = [{"input": "send 2 blue mugs to leeds", "output": "mugs"}, {"input": "city please", "output": "leeds"}]


@pytest.fixture(scope="session", params=TRAINED)
def variant_run(request, tiny_model, tmp_path_factory):
    """A 3-step run of the tiny model with one variant (validated and checkpointed at its last step)."""
    from conftest import varied_rows, write_jsonl

    from loratune import train

    settings = {**VARIANTS, "loraplus": {"loraplus_lr_ratio": 16.0}}[request.param]
    root = tmp_path_factory.mktemp(request.param)
    cfg = TrainConfig(
        model=tiny_model,
        train_data=write_jsonl(root / "train.jsonl", varied_rows(16)),
        val_data=write_jsonl(root / "val.jsonl", varied_rows(2, seed=1)),
        test_data=write_jsonl(root / "test.jsonl", SHORT_ANSWERS) if request.param in ("pissa", "olora") else None,
        output_dir=str(root / "run"),
        max_steps=STEPS,
        eval_every_steps=STEPS,
        batch_size=4,
        gradient_accumulation_steps=1,
        precision="fp32",
        device="cpu",
        learning_rate=1e-2,
        max_length=256,
        **settings,
    )
    train(cfg)
    return cfg, root / "run"


def trained_model(cfg: TrainConfig, run):
    """The model as training left it: the base with cfg's adapters as initialised (PiSSA/OLoRA: the base minus
    their initial part), then the last checkpoint's weights as trained."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loratune.modeling.adapter import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32), cfg)
    saved = run / "checkpoints" / f"step-{STEPS:06d}" / "adapter" / "adapter_model.safetensors"
    result = set_peft_model_state_dict(model, load_file(saved))
    assert not result.unexpected_keys
    return model.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(3))


def test_merge_gives_the_trained_model_for_each_variant(variant_run):
    """`merge`'s model (of the run's saved adapter: PiSSA/OLoRA converted, DoRA's magnitudes, modules_to_save's
    layers) computes the trained model's logits within 1e-4 (fp32), and the adapter changed them."""
    from transformers import AutoModelForCausalLM

    from loratune.inference.merge import merged_model

    cfg, run = variant_run
    expected = _logits(trained_model(cfg, run), IDS)
    base = _logits(AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32), IDS)
    assert (expected - base).abs().max() > 0.05  # training moved the model: matching it means something
    merged = merged_model(run, "last", torch.float32).model
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (_logits(merged, IDS) - expected).abs().max() < 1e-4
    saved = json.loads((run / "last" / "adapter_config.json").read_text())
    assert saved["r"] == (2 if cfg.lora_init in BASE_CHANGING_INITS else 1) * cfg.lora_r  # plain LoRA: rank doubled


@pytest.mark.parametrize("variant_run", ["pissa", "olora"], indirect=True)
def test_the_base_models_held_out_answers_are_the_bases(variant_run):
    """PiSSA/OLoRA: with the adapter off, the model lacks the base's part the adapter took; the answers the run gives
    for the base model before training are still the base's (those of `loratune eval`, whose base is the original
    base alone)."""
    from loratune.inference.evaluate import evaluate_run

    cfg, run = variant_run
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before = next(e for e in events if e.get("event") == "test" and e.get("model") == "base model")
    evaluate_run(run, cfg.test_data, report=run / "eval.jsonl", generate=True)
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()][1:]
    assert before["samples"] == [row["base"] for row in rows][:2]


# --- GGUF: llama.cpp computes each variant's trained model ------------------------------------------------------


def test_llama_cpp_computes_each_variant_as_trained(variant_run, tmp_path):
    """The merged GGUF of every variant, and the adapter-only GGUF on the base's GGUF where llama.cpp can hold the
    adapter (rsLoRA's scale folded into alpha, PiSSA/OLoRA converted), give the trained model's logits in llama.cpp
    (f16: within 1% of their largest, the same argmax everywhere); DoRA and modules_to_save are refused in one line
    that points to the merged export."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make llama-cpp`)")
    from test_gguf_export import _base_gguf, load, logits

    from loratune.core.errors import UserError
    from loratune.inference.export import export_gguf

    cfg, run = variant_run
    ids = IDS[0].tolist()
    expected = _logits(trained_model(cfg, run), IDS[:1])[0].numpy()
    files = [{"model": export_gguf(run, tmp_path / "m-f16.gguf").path}]
    refused = "DoRA's magnitude vectors" if cfg.use_dora else "whole trained layers" if cfg.modules_to_save else None
    if refused:
        with pytest.raises(UserError) as e:
            export_gguf(run, tmp_path / "a-f16.gguf", adapter_only=True)
        assert refused in str(e.value) and "export the merged model" in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "a-f16.gguf").exists()
    else:
        adapter = export_gguf(run, tmp_path / "a-f16.gguf", adapter_only=True)
        files.append({"model": _base_gguf(run, tmp_path), "lora_path": str(adapter.path)})
    for options in files:
        llm = load(llama_cpp, options.pop("model"), **options)
        try:
            got = logits(llm, ids)
        finally:
            llm.close()
        assert np.abs(got - expected).max() < 0.01 * np.abs(expected).max(), options
        assert (got.argmax(-1) == expected.argmax(-1)).all(), options


@pytest.mark.parametrize("variant_run", ["pissa"], indirect=True)
def test_a_pissa_checkpoints_adapter_as_trained_is_not_exported_as_plain_lora(variant_run, tmp_path):
    from loratune.core.errors import UserError
    from loratune.inference.export import export_gguf

    _, run = variant_run
    checkpoint = str(run / "checkpoints" / f"step-{STEPS:06d}")
    with pytest.raises(UserError, match="this adapter is pissa's as trained, right only on the base it changed"):
        export_gguf(run, tmp_path / "a.gguf", adapter_only=True, adapter=checkpoint)


# --- Memory: the plan counts each variant's weights, state and activations -------------------------------------


def test_each_variants_weights_gradients_and_adamw_state_are_counted_exactly(tiny_model):
    """DoRA's magnitudes count as adapter weights (fp32); modules_to_save's copies with their gradients and AdamW
    state in the base dtype: against the model built for real after one AdamW step."""
    from transformers import AutoConfig

    from loratune.memory.arithmetic import MemoryModel
    from loratune.memory.shape import shape_from_config

    cfg = TrainConfig(use_dora=True, modules_to_save=["lm_head"], lora_dropout=0.0)
    model = _model(tiny_model, cfg, True)
    _logits_and_grads(model, IDS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    optimizer.step()
    measured = {"adapter": 0, "saved": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state = optimizer.state[p]
            tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            measured["saved" if "modules_to_save" in name else "adapter"] += sum(t.nbytes for t in tensors)
    items = MemoryModel.for_run(cfg, shape_from_config(AutoConfig.from_pretrained(tiny_model), cfg), "cpu",
                                torch.float32).static_bytes()  # fmt: skip
    adapter = sum(v for k, v in items.items() if k.startswith(("LoRA", "AdamW")))
    assert (adapter, items["modules_to_save copies, their gradients and AdamW state (4 x fp32)"]) == (
        measured["adapter"],
        measured["saved"],
    )


def _config(large: bool):
    from transformers import LlamaConfig

    sizes = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    small = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(vocab_size=49152 if large else 1000, num_hidden_layers=2, **(sizes if large else small))


PASS_CASES = {  # settings, the SmolLM2-135M block and vocabulary (else a small one), base dtype
    "dora": ({"use_dora": True}, False, torch.float32),
    "dora without dropout": ({"use_dora": True, "lora_dropout": 0.0}, False, torch.float32),
    "dora bf16": ({"use_dora": True}, False, torch.bfloat16),
    "dora bf16 without dropout": ({"use_dora": True, "lora_dropout": 0.0}, False, torch.bfloat16),
    "dora bf16, smollm2-135m blocks": ({"use_dora": True}, True, torch.bfloat16),
    "embeddings and head trained": ({"modules_to_save": ["embed_tokens", "lm_head"]}, False, torch.float32),
    "head trained, smollm2-135m vocabulary": ({"modules_to_save": ["lm_head"]}, True, torch.float32),
    "head trained bf16, smollm2-135m vocabulary": ({"modules_to_save": ["lm_head"]}, True, torch.bfloat16),
}


@pytest.mark.parametrize("case", PASS_CASES)
def test_a_variants_pass_is_planned_within_5_percent_of_its_measured_peak(case):
    """One pass's estimated activations and working memory against the CPU allocator's measured peak increase
    (as tests/test_memory.py checks plain LoRA): DoRA runs PEFT's layer, a trained head an unchunked loss."""
    from transformers import LlamaForCausalLM

    from bench.measure import measure_pass
    from loratune.memory.arithmetic import MemoryModel
    from loratune.memory.shape import shape_from_config

    settings, large, dtype = PASS_CASES[case]
    cfg, config = TrainConfig(**settings), _config(large)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype)
    base.config.use_cache = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bytes, not speed: one thread spares OpenMP's waits on a busy shared CPU
    try:
        measured, batch = measure_pass(base, cfg, [300, 212], 0.5)
    finally:
        torch.set_num_threads(threads)
    estimated = MemoryModel.for_run(cfg, shape_from_config(config, cfg), "cpu", dtype).batch_bytes(batch)
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)


def test_the_ui_form_offers_each_variant_setting():
    from loratune.ui.form import schema

    fields = {f["name"]: f for f in schema()["fields"]}
    assert fields["use_dora"]["kind"] == fields["use_rslora"]["kind"] == "bool"
    assert fields["lora_init"]["choices"] == ["kaiming", "gaussian", "pissa", "pissa_fast", "olora"]
    assert fields["loraplus_lr_ratio"]["allowed"] == "a number >= 1"
    assert "embed_tokens,lm_head" in fields["modules_to_save"]["help"]

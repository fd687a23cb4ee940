import numpy as np
import torch

from loratune import TrainConfig
from loratune.data.batching import collate_packed
from loratune.modeling.adapter import add_lora
from loratune.modeling.attention import NAME
from loratune.modeling.loss import CausalLMLoss, target_cross_entropy, token_logprobs
from loratune.modeling.model import load_model


def test_last_mlp_on_target_rows_only_gives_the_same_loss_and_gradients(tiny_model):
    base = load_model(tiny_model, torch.float32, torch.device("cpu"))
    base.set_attn_implementation(NAME)
    cfg = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear", seed=0)
    model = add_lora(base, cfg).train()
    for name, p in model.named_parameters():  # B = 0 would leave A without gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(5, 500, n) for n in (9, 14, 6)]
    targets = [np.where(np.arange(len(x)) >= len(x) // 2, x, -100) for x in inputs]  # prompts masked
    batch = collate_packed(inputs, targets)
    loss_module = CausalLMLoss(model)
    mlp_rows = []
    loss_module.last_mlp.register_forward_hook(lambda m, args, out: mlp_rows.append(args[0].shape[-2]))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = loss_module(batch)
        return loss.detach(), torch.autograd.grad(loss, trainable)

    subset = loss_and_grads()
    loss_module.last_mlp = None  # the plain path: the last MLP on every row
    full = loss_and_grads()
    assert mlp_rows == [int((batch.targets != -100).sum()), sum(map(len, inputs))]
    torch.testing.assert_close(subset[0], full[0], rtol=1e-6, atol=0)
    for got, want in zip(subset[1], full[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_shape_buckets_give_the_same_loss_and_gradients(tiny_model):
    """A row filled up to its bucket size, and target rows filled with other rows: the loss and the adapters'
    gradients are those of the exact row; the filler counts as padding, not as tokens."""
    base = load_model(tiny_model, torch.float32, torch.device("cpu"))
    base.set_attn_implementation(NAME)
    cfg = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear", seed=0)
    model = add_lora(base, cfg).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    rng = np.random.default_rng(1)
    inputs = [rng.integers(5, 500, n) for n in (13, 21, 35)]  # 69 tokens: bucket 72
    targets = [np.where(np.arange(len(x)) >= len(x) - 5, x, -100) for x in inputs]  # 5 target rows each
    targets[0][-7:] = inputs[0][-7:]  # 17 target rows in all: filled to 20 (4 sizes per octave)
    exact, filled = collate_packed(inputs, targets), collate_packed(inputs, targets, pad_id=0)
    assert filled.input_ids.numel() == 72 and filled.padding == 3 and filled.n_tokens == exact.n_tokens == 69
    assert filled.n_targets == exact.n_targets == 17
    trainable = [p for p in model.parameters() if p.requires_grad]
    mlp_rows = []

    def loss_and_grads(batch, buckets):
        loss_module = CausalLMLoss(model, shape_buckets=buckets)
        handle = loss_module.last_mlp.register_forward_hook(lambda m, args, out: mlp_rows.append(args[0].shape[-2]))
        loss = loss_module(batch)
        handle.remove()
        return loss.detach(), torch.autograd.grad(loss, trainable)

    want, got = loss_and_grads(exact, False), loss_and_grads(filled, True)
    assert mlp_rows == [17, 20]
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_chunked_loss_equals_full_logits_across_chunk_boundaries(monkeypatch):
    """Several chunks, the last one partial: same summed loss and hidden-state gradient as full fp32 logits."""
    monkeypatch.setattr("loratune.modeling.loss.CHUNK_TOKENS", 4)
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(11, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=gen)
    chunked = target_cross_entropy(hidden, head, targets)
    (grad_chunked,) = torch.autograd.grad(chunked * 3.0, hidden)  # a scaled loss scales the gradient
    full = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (grad_full,) = torch.autograd.grad(full * 3.0, hidden)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-5, atol=1e-6)


def test_chunked_logprobs_equal_full_logits_in_values_and_gradients(monkeypatch):
    """The per-token log-probabilities preference losses sum per answer: several chunks (the last partial), ignored
    rows, and a different incoming gradient per token."""
    monkeypatch.setattr("loratune.modeling.loss.CHUNK_TOKENS", 4)
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(11, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=gen)
    targets[[2, 7]] = -100
    weights = torch.randn(11, generator=gen)
    chunked = token_logprobs(hidden, head, targets)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), hidden)
    full = torch.log_softmax(head(hidden), -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    full = full * (targets != -100)
    (grad_full,) = torch.autograd.grad((full * weights).sum(), hidden)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-5, atol=1e-6)
    assert not grad_chunked[[2, 7]].any()


def test_bf16_base_keeps_lora_weights_gradients_and_optimizer_state_in_fp32(tiny_model):
    base = load_model(tiny_model, torch.bfloat16, torch.device("cpu"))
    base.set_attn_implementation(NAME)
    cfg = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules="all-linear", seed=0)
    model = add_lora(base, cfg).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    inputs = [np.arange(5, 17), np.arange(20, 29)]
    CausalLMLoss(model)(collate_packed(inputs, inputs)).backward()
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    assert frozen == {torch.bfloat16} and trainable
    assert {p.dtype for p in trainable} == {p.grad.dtype for p in trainable} == {torch.float32}
    assert {t.dtype for s in optimizer.state.values() for k, t in s.items() if k != "step"} == {torch.float32}
    assert all(p.grad.abs().sum() > 0 for n, p in named if "lora_B" in n)  # the backward reached every adapter

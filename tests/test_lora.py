import pytest
import torch
from peft import LoraConfig, get_peft_model

from loratune.modeling import lora
from loratune.modeling.lora import FusedLoraLinear, drop_positions


def _layers(dropout: float, dtype=torch.float32):
    """The same LoRA layer twice: PEFT's own and ours, with identical (non-zero) weights."""
    out = []
    for custom in (False, True):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=True).to(dtype))
        config = LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout, target_modules=["0"])
        if custom:
            config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
        layer = get_peft_model(base, config, autocast_adapter_dtype=True).base_model.model[0]
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        out.append(layer)
    assert isinstance(out[1], FusedLoraLinear) and not isinstance(out[0], FusedLoraLinear)
    return out


def _run(layer, x, grad):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def test_fused_layer_equals_peft_without_dropout():
    peft, fused = _layers(0.0)
    x, grad = torch.randn(3, 7, 24), torch.randn(3, 7, 40)
    for a, b in zip(_run(peft, x, grad), _run(fused, x, grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_layer_with_dropout_equals_the_formula_with_the_same_mask():
    _, fused = _layers(0.3)
    x, grad = torch.randn(5, 24), torch.randn(5, 40)
    torch.manual_seed(1)
    y, gx, ga, gb = _run(fused, x, grad)
    torch.manual_seed(1)  # the same random numbers: rebuild the layer's output by hand
    keep = torch.ones(x.shape, dtype=torch.bool)
    keep.view(-1)[drop_positions(x.numel(), 0.3)] = False
    a, b, base = fused.lora_A["default"].weight, fused.lora_B["default"].weight, fused.base_layer
    ref_x = x.detach().clone().requires_grad_()
    ref_a, ref_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = base(ref_x) + (torch.where(keep, ref_x, 0) / 0.7) @ ref_a.T @ ref_b.T * fused.scaling["default"]
    ref.backward(grad)
    for got, want in ((y, ref), (gx, ref_x.grad), (ga, ref_a.grad), (gb, ref_b.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert 0.2 < 1 - keep.float().mean() < 0.4


def test_fused_layer_in_a_bf16_base_matches_fp32_math():
    """In a bf16 base the adapter's products run in bf16 (as under autocast); output and gradients stay within
    bf16 rounding of the same layer computed in fp32, and lora_A/lora_B's gradients are fp32."""
    _, fused = _layers(0.0, torch.bfloat16)
    x, grad = torch.randn(64, 24).bfloat16(), torch.randn(64, 40).bfloat16()
    y, gx, ga, gb = _run(fused, x, grad)
    assert y.dtype == gx.dtype == torch.bfloat16 and ga.dtype == gb.dtype == torch.float32
    a, b, base = fused.lora_A["default"].weight, fused.lora_B["default"].weight, fused.base_layer
    ref_x = x.float().requires_grad_()
    ref_a, ref_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = ref_x @ base.weight.float().T + base.bias.float() + ref_x @ ref_a.T @ ref_b.T * fused.scaling["default"]
    ref.backward(grad.float())
    for got, want in ((y, ref), (gx, ref_x.grad), (ga, ref_a.grad), (gb, ref_b.grad)):
        torch.testing.assert_close(got.float(), want, atol=0.05 * want.abs().max().item(), rtol=0.02)


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.9])
def test_drop_rate_is_p_everywhere(p):
    torch.manual_seed(0)
    n = 400_000
    dropped = drop_positions(n, p)
    assert dropped.dtype == torch.int64 and (dropped.diff() > 0).all() and 0 <= dropped[0] and dropped[-1] < n
    tolerance = 4 * (p * (1 - p) / (n / 4)) ** 0.5  # four standard deviations of a quarter's rate
    for quarter in (dropped // (n // 4)).bincount():
        assert abs(quarter.item() / (n / 4) - p) < tolerance
    assert abs((dropped.diff() == 1).float().mean().item() - p) < 0.01  # memoryless: P(next dropped) = p


def test_eval_and_no_grad_use_peft_path():
    peft, fused = _layers(0.5)
    fused.eval(), peft.eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(peft(x), fused(x))


def test_drops_are_independent_across_calls_and_seeded_by_torch():
    torch.manual_seed(0)
    p, n = 0.3, 400_000
    first, second = drop_positions(n, p), drop_positions(n, p)
    both = torch.isin(first, second).sum().item() / n
    assert abs(both - p**2) < 0.004  # independent draws, not the same stream twice
    torch.manual_seed(0)
    assert torch.equal(drop_positions(n, p), first)


def test_drops_drawn_in_several_rounds_keep_the_rate(monkeypatch):
    monkeypatch.setattr(lora, "_draw_size", lambda expected: 50)
    torch.manual_seed(0)
    dropped = drop_positions(100_000, 0.05)
    assert (dropped.diff() > 0).all() and dropped[-1] < 100_000
    assert abs(len(dropped) / 100_000 - 0.05) < 0.003


def test_both_records_of_the_drops_give_the_same_input_gradient():
    """The input gradient leaves out the adapter's part at dropped elements, whether they are recorded as flat
    indices (CPU) or as a keep mask (accelerators; run here on CPU tensors)."""
    grad_x, grad_h, lora_a = torch.randn(6, 10), torch.randn(6, 3), torch.randn(3, 10)
    positions = drop_positions(grad_x.numel(), 0.3)
    keep = torch.ones(grad_x.shape, dtype=torch.bool)
    keep.view(-1)[positions] = False
    by_index, by_mask = grad_x.clone(), grad_x.clone()
    lora._add_input_grad(by_index, grad_h, lora_a, positions)
    lora._add_input_grad(by_mask, grad_h, lora_a, keep)
    want = grad_x + torch.where(keep, grad_h @ lora_a, 0)
    torch.testing.assert_close(by_index, want)
    torch.testing.assert_close(by_mask, want)
    assert torch.equal(by_index[~keep], grad_x[~keep]) and len(positions) > 0

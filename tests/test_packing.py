import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from loratune.data.batching import collate_packed
from loratune.modeling.attention import NAME


def _logits(model, examples):
    batch = collate_packed(examples, [np.full_like(x, -100) for x in examples])
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=torch.ones_like(batch.input_ids),
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
        ).logits[0]


def test_examples_in_a_packed_row_do_not_see_each_other(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.set_attn_implementation(NAME)
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(5, 500, n) for n in (7, 12, 5))
    packed = _logits(model, [a, b, c])
    changed = _logits(model, [rng.integers(5, 500, 7), b, c])  # only the first example differs
    torch.testing.assert_close(packed[7:], changed[7:], atol=1e-6, rtol=0)
    assert not torch.allclose(packed[:7], changed[:7])
    # and each example's logits are those it gets alone, unpacked
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        alone = model(input_ids=torch.from_numpy(b)[None]).logits[0]
    torch.testing.assert_close(packed[7:19], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_packed_attention_values_and_gradients_equal_attention_per_example(window):
    """Both paths: SDPA's CPU kernels per example (causal), and autograd through slices (here a sliding window)."""
    from types import SimpleNamespace

    from loratune.modeling.attention import packed_attention

    gen = torch.Generator().manual_seed(0)
    lengths = [3, 9, 1, 6]
    rows = sum(lengths)
    q, k, v = (torch.randn(1, heads, rows, 8, generator=gen, requires_grad=True) for heads in (4, 2, 2))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    module = SimpleNamespace(training=True, sliding_window=window)
    out, _ = packed_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
    weights = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))

    expected, start = [], 0
    for n in lengths:
        idx = torch.arange(n)
        mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < (window or n))
        sl = [t[:, :, start : start + n] for t in (q, k, v)]
        expected.append(torch.nn.functional.scaled_dot_product_attention(*sl, attn_mask=mask, enable_gqa=True))
        start += n
    reference = torch.cat(expected, dim=2).transpose(1, 2)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad((reference * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_attention_of_a_bf16_model_on_cpu_is_computed_in_fp32():
    """PyTorch's CPU flash kernels run bf16 slower than fp32 (and round more): a bf16 model attends in fp32."""
    from types import SimpleNamespace

    from loratune.modeling.attention import packed_attention

    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    q, k, v = (torch.randn(1, heads, 20, 8, generator=gen).bfloat16().requires_grad_() for heads in (4, 2, 2))
    module = SimpleNamespace(training=True, sliding_window=None)
    outputs = []
    for inputs in ((q, k, v), [t.float() for t in (q, k, v)]):
        out, _ = packed_attention(module, *inputs, None, cu_seq_lens_q=cu, max_length_q=8)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        outputs.append((out, *grads))
    assert outputs[0][0].dtype == torch.bfloat16
    for got, fp32 in zip(*outputs):
        assert torch.equal(got, fp32.bfloat16())


@pytest.mark.parametrize("world", [1, 2])
def test_a_packed_step_takes_the_fewest_passes_that_hold_it_within_the_largest_padded_batch(world):
    """Each pass holds at most batch_size x the longest example's tokens (the largest padded batch), every example
    goes into exactly one, and there are no more passes than gradient_accumulation_steps (x processes)."""
    from loratune.data.plan import StepPlan

    rng = np.random.default_rng(0)
    for trial in range(300):
        batch_size, accumulation = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        skewed = np.minimum(rng.lognormal(4, 1, size=400).astype(int) + 1, 600)
        lengths = skewed if trial % 2 else rng.integers(20, 60, size=400)  # even: the budget is tight
        step = rng.permutation(400)[: batch_size * accumulation * world]
        budget = batch_size * int(lengths.max())
        plan = StepPlan(lengths, lengths, batch_size * accumulation * world, batch_size, True, world)
        passes = plan.passes(step)
        assert sorted(i for p in passes for i in p) == sorted(step.tolist())
        assert len(passes) % world == 0 and len(passes) <= accumulation * world
        assert max(int(lengths[p].sum()) for p in passes) <= budget
        fewest = world * math.ceil(math.ceil(int(lengths[step].sum()) / budget) / world)
        assert len(passes) <= fewest + world, (trial, len(passes), fewest)  # at most one extra round when balancing
        groups = StepPlan(lengths[step], lengths[step], len(step), batch_size).eval_passes()  # validation's
        assert np.array_equal(np.concatenate(groups), np.argsort(lengths[step], kind="stable"))
        assert all(int(lengths[step][g].sum()) <= budget or len(g) == 1 for g in groups)
    # Short examples share a pass: 64 examples of 10 tokens and one of 100 fit one pass of 8 x 100 tokens.
    lengths = np.array([100] + [10] * 63)
    assert len(StepPlan(lengths, lengths, 64, 8).passes(np.arange(64))) == 1

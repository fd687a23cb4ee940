import numpy as np
import torch
from transformers import AutoModelForCausalLM

from loratune.attention import NAME
from loratune.data.batching import collate_packed


def _logits(model, examples):
    batch = collate_packed(examples, [np.full_like(x, -100) for x in examples])
    with torch.no_grad():
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                     attention_mask=torch.ones_like(batch.input_ids), cu_seq_lens_q=batch.cu_seqlens,
                     cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen).logits[0]


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

"""GRPO's building blocks: prompt rows to token ids, seeded sampling, and the objective's advantages, per-token loss
and normalisations, checked against TRL 1.16's GRPOTrainer on the same tiny model, LoRA adapter and tokens."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from loratune import TrainConfig
from loratune.core.errors import UserError
from loratune.data.formats import Example
from loratune.data.prompts import PromptRow, PromptSet, prepare_prompts
from loratune.modeling import objective as objective_module
from loratune.modeling.adapter import add_lora
from loratune.modeling.generate import SeededSampling, generate_ids, row_generator
from loratune.modeling.grpo import group_advantages
from loratune.modeling.model import load_model
from loratune.modeling.objective import GRPO

RTOL = 1e-5  # the parity asked for: relative, fp32
GROUP = 4
REWARDS = [0.0, 1.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0, 3.0]  # three groups, the second with zero std


class FixedRewards:
    """A reward function of `data.rewards.Rewards`' shape that returns given scores, in order."""

    names = ("fixed",)

    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.calls = []

    def __call__(self, prompts, completions, columns, completion_tokens):
        self.calls.append((prompts, completions, columns, completion_tokens))
        scores = self.scores[: len(completions)]
        return 2.0 * scores, {"fixed": scores}  # weight 2


def _policy(tiny_model):
    """The tiny model with a fixed, non-zero LoRA adapter (B = 0 would make the policy its own reference)."""
    base = load_model(tiny_model, torch.float32, torch.device("cpu"))
    return _set_adapter(add_lora(base, TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0)).eval())


def _set_adapter(model, seed=0, scale=0.5, add=False):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(p * add + torch.randn(p.shape, generator=gen) * scale)
    return model


def _prompts(encoder, n=3):
    """Prompts of equal token length (TRL's forward left-pads prompts without shifting position ids)."""
    candidates = [f"send {w} mugs to leeds" for w in "two red six ten old new big hot".split()]
    encoded = [(encoder.prompt_ids(Example(messages=[{"role": "user", "content": t}])), t) for t in candidates]
    width = encoded[0][0].__len__()
    ids, texts = zip(*[(x, t) for x, t in encoded if len(x) == width][:n])
    assert len(ids) == n
    return PromptSet([PromptRow(x, t, {"reference": "ok"}, f"row {i}") for i, (x, t) in enumerate(zip(ids, texts))], 8)


def _answers(tokenizer, n):
    """Answers of several lengths, each through <|im_end|>, as sampled answers are."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = "order mugs leeds friday blue red lamp notebook please city".split()
    return [tokenizer(" ".join(words[: 1 + (3 * k) % 7]), add_special_tokens=False).input_ids + [end] for k in range(n)]


def _cfg(**overrides):
    settings = dict(objective="grpo", num_generations=GROUP, temperature=0.7, max_new_tokens=8, grpo_beta=0.04,
                    reward=("regex:m",))  # fmt: skip
    return TrainConfig(**settings | overrides)


# --- TRL parity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "theirs"), [("grpo", "grpo"), ("dr_grpo", "dr_grpo"), ("token", "dapo")])
def test_loss_and_advantages_equal_trl_grpo_trainer(
    ours, theirs, tiny_model, tokenizer, encoder, tmp_path, monkeypatch
):
    """Fixed prompts, answers and rewards; the adapter moved after sampling, so ratios leave 1 and some are clipped:
    the advantages, the sampling-time and reference log-probabilities of every token, the loss and its gradient
    equal TRL's GRPOTrainer's own."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    data = _prompts(encoder)
    answers = _answers(tokenizer, len(data) * GROUP)
    cfg = _cfg(grpo_loss=ours, updates_per_generation=2, epsilon=0.05)
    rewards = FixedRewards(REWARDS)

    def rollout(prompts, trainer):
        return {"prompt_ids": [p for p in (x.ids for x in data.items) for _ in range(GROUP)], "completion_ids": answers,
                "logprobs": None}  # fmt: skip

    def fixed(prompts, completions, **columns):
        return REWARDS[: len(completions)]

    from peft import LoraConfig

    trainer = GRPOTrainer(
        # TRL makes the adapter: given a PEFT model it would keep its first adapter as the reference
        model=load_model(tiny_model, torch.float32, torch.device("cpu")),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
        reward_funcs=[fixed],
        args=GRPOConfig(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, reward_weights=[2.0],
            per_device_train_batch_size=len(answers), num_generations=GROUP, gradient_accumulation_steps=1,
            max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, beta=cfg.grpo_beta,
            epsilon=cfg.epsilon, loss_type=theirs, num_iterations=2,
        ),
        train_dataset=Dataset.from_list([{"prompt": x.text} for x in data.items]),
        processing_class=tokenizer,
        rollout_func=rollout,
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    policy = _set_adapter(trainer.model).eval()
    examples = list(range(len(data)))
    with torch.no_grad():
        theirs_in = trainer._generate_and_score_completions(
            [{"prompt": x.text} for x in data.items for _ in range(GROUP)]
        )

    objective = GRPO(cfg, encoder, rewards)
    monkeypatch.setattr(objective_module, "sample_answers", lambda *args, **kwargs: answers)
    module = objective.module(policy)
    plan = SimpleNamespace(micro_batch=len(data))
    units = objective.start_step(module, plan, data, examples, [examples], 0, lambda x: x)
    mask = theirs_in["completion_mask"].bool()
    _close("advantages", torch.from_numpy(np.concatenate([objective.groups[i].advantages for i in examples])),
           theirs_in["advantages"])  # fmt: skip
    old = torch.cat([t for i in examples for t in objective.groups[i].old])
    _close("old log-probabilities", old, theirs_in["old_per_token_logps"][mask])
    with torch.no_grad():
        batch = objective.batch(plan, data, examples, tokenizer.pad_token_id)
        _, ref, _ = module(batch.sequences)
    _close("reference log-probabilities", ref, theirs_in["ref_per_token_logps"][mask])

    _set_adapter(policy, seed=1, scale=0.2, add=True)  # one update later
    policy.train()
    grads = {}
    for side in ("ours", "theirs"):
        policy.zero_grad()
        if side == "ours":
            assert objective.start_step(module, plan, data, examples, [examples], 1, lambda x: x) == units
            batch = objective.batch(plan, data, examples, tokenizer.pad_token_id)
            out = objective.forward(module, batch)
            loss = out.loss / units
        else:
            loss = trainer._compute_loss(policy, theirs_in)
        loss.backward()
        grads[side] = (loss.detach(), torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    policy.eval()
    _close("loss", grads["ours"][0], grads["theirs"][0])
    _close("gradient", grads["ours"][1], grads["theirs"][1], scale=grads["theirs"][1].abs().max())
    assert 0 < out.metrics["clipped"] and out.metrics["kl"] > 0  # the clip and the KL term took part
    assert out.metrics["zero_std_groups"] / units == pytest.approx(1 / 3)  # the second group's rewards are equal
    assert len(rewards.calls) == 1  # scored once, at sampling; the second update reuses the answers


def test_reference_log_probabilities_are_the_base_s(tiny_model, tokenizer, encoder):
    """The KL term's reference: the same model with the adapter off, at the sampling temperature."""
    from loratune.modeling.grpo import answer_batch

    data, policy = _prompts(encoder), _policy(tiny_model)
    answers = _answers(tokenizer, len(data))
    module = GRPO(_cfg(), encoder, FixedRewards(REWARDS)).module(policy)
    batch = answer_batch([x.ids for x in data.items], answers, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, reference, _ = module(batch)
        with policy.disable_adapter():
            logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits / 0.7
    targets = batch.targets
    expected = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None])[..., 0][targets != -100]
    _close("reference log-probabilities", reference, expected)
    assert not torch.allclose(logps, reference)  # the adapter is on for the policy


def _close(name, ours, theirs, scale=None):
    ours, theirs = (torch.as_tensor(x.detach(), dtype=torch.float64) for x in (ours, theirs))
    assert ours.shape == theirs.shape, f"{name}: shapes {ours.shape} and {theirs.shape}"
    base = theirs.abs() if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    assert ((ours - theirs).abs() <= RTOL * base + 1e-7).all(), f"{name}: ours {ours.tolist()}, TRL's {theirs.tolist()}"


# --- Prompt rows ------------------------------------------------------------------------------------------------


def test_prompt_rows_and_sft_rows_become_prompts_with_their_columns(tiny_model, encoder, tokenizer, tmp_path):
    """A text prompt is raw text, turns are rendered with the generation prompt, an SFT row's answer becomes the
    reference; other columns are kept for the rewards, one entry per sampled answer."""
    turns = [{"role": "user", "content": "two mugs to leeds"}]
    rows = [
        {"prompt": "mugs to leeds?", "answer": "2"},
        {"prompt": turns, "answer": "3", "level": 1},
        {"input": "two mugs to leeds", "output": '{"item": "mugs"}'},
    ]
    sets = []
    for k, row in enumerate(rows):
        cfg = _cfg(model=tiny_model, train_data=write_jsonl(tmp_path / f"{k}.jsonl", [row] * 2), val_ratio=0)
        sets.append(prepare_prompts(cfg, encoder).train)
    text, chat, sft = (s.items[0] for s in sets)
    assert tokenizer.decode(text.ids) == "mugs to leeds?" and text.columns == {"answer": "2"}
    assert chat.ids == encoder.prompt_ids(Example(messages=[*turns, {"role": "assistant", "content": "x"}]))
    assert chat.text == "two mugs to leeds" and chat.columns == {"answer": "3", "level": 1}
    assert sft.ids == chat.ids and sft.columns == {"reference": '{"item": "mugs"}'}
    assert sets[1].columns([0, 1], repeat=2) == {"answer": ["3"] * 4, "level": [1] * 4}
    assert list(sets[0].lengths) == [len(text.ids) + 8] * 2 and list(sets[0].target_counts) == [8, 8]


def test_max_length_cuts_prompts_from_the_left_and_counts_them(tiny_model, encoder, tmp_path):
    rows = [{"prompt": "a short one"}, {"prompt": "a much longer prompt " * 20}]
    cfg = _cfg(model=tiny_model, train_data=write_jsonl(tmp_path / "p.jsonl", rows), val_ratio=0, max_length=48)
    data = prepare_prompts(cfg, encoder)
    room = 48 - cfg.max_new_tokens
    full = encoder.prompt_ids(Example(prompt=rows[1]["prompt"]))
    assert data.train.items[1].ids == full[-room:] and data.report.train_fit.truncated == 1
    assert len(data.train) == 2 and max(data.train.lengths) == 48
    with pytest.raises(UserError, match="max_length=16 leaves no room for a prompt before max_new_tokens=16"):
        prepare_prompts(_cfg(model=tiny_model, train_data=cfg.train_data, max_length=16, max_new_tokens=16), encoder)


# --- Sampling ---------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_the_same_for_any_split_into_batches(tiny_model, tokenizer, encoder):
    """Each answer draws from its own generator, seeded by (seed, step, prompt, sample): batches of 6, 2 or 1 and
    another order sample the same tokens; another step's key samples others. Greedy decoding of the same model
    differs (it is sampling)."""
    model, data = _policy(tiny_model), _prompts(encoder)
    prompts = [x.ids for x in data.items for _ in range(2)]
    keys = [(42, 0, i // 2, i % 2) for i in range(len(prompts))]
    end, pad = encoder.end_ids, tokenizer.pad_token_id

    def sample(order, batch, keys=keys, top_p=1.0):
        gens = [row_generator(*keys[i]) for i in order]
        out = generate_ids(model, [prompts[i] for i in order], end, pad, 12, batch,
                           processor_for=lambda rows: SeededSampling([gens[r] for r in rows], 0.8, top_p))  # fmt: skip
        return [out[order.index(i)] for i in range(len(prompts))]

    whole = sample(list(range(6)), 6)
    assert sample(list(range(6)), 2) == whole == sample([5, 3, 1, 0, 2, 4], 1)
    assert sample(list(range(6)), 6, keys=[(42, 1, *k[2:]) for k in keys]) != whole
    assert len({tuple(a) for a in whole}) > 3  # two samples of a prompt differ
    assert generate_ids(model, prompts, end, pad, 12, 6) != whole
    nucleus = sample(list(range(6)), 6, top_p=1e-6)  # the most likely token alone: greedy
    assert nucleus == generate_ids(model, prompts, end, pad, 12, 6)


def test_advantages_are_normalised_within_each_group_and_zero_variance_groups_are_flagged():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    advantages, std, zero = group_advantages(rewards, GROUP)
    grouped = rewards.view(-1, GROUP)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(advantages, expected.flatten())
    assert zero.tolist() == [False] * 4 + [True] * 4 + [False] * 4 and (advantages[4:8] == 0).all()
    assert std[0] == pytest.approx(float(np.std(REWARDS[:4], ddof=1)))

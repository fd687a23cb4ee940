"""Preference tuning's building blocks: rows to token ids, per-token log-probabilities, and the DPO, IPO, ORPO, SimPO
and KTO losses, each checked against TRL's own trainers on the same tiny model, LoRA adapter and tokens."""

import contextlib
import json

import pytest
import torch
from conftest import write_jsonl

from loratune import TrainConfig
from loratune.core.errors import BadRowError, UserError
from loratune.data.batching import collate_packed, collate_padded
from loratune.data.formats import Example
from loratune.data.pairs import LabeledAnswer, PreferencePair, kl_pairs, read_preferences
from loratune.modeling import preference
from loratune.modeling.adapter import add_lora
from loratune.modeling.attention import NAME
from loratune.modeling.model import load_model
from loratune.modeling.preference import (
    PairLogprobs,
    dpo_loss,
    ipo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    sequence_logprobs,
    simpo_loss,
)

RTOL = 1e-5  # the parity asked for: relative, fp32


def _user(text):
    return [{"role": "user", "content": text}]


def _answer(text):
    return [{"role": "assistant", "content": text}]


SYSTEM = [{"role": "system", "content": "be brief"}]
PAIRS = [
    {
        "prompt": _user("send two blue mugs to leeds"),
        "chosen": _answer("order: mugs, 2, leeds"),
        "rejected": _answer("no"),
    },
    {
        "chosen": [*SYSTEM, *_user("a lamp please"), *_answer("item lamp, quantity 1")],
        "rejected": [*SYSTEM, *_user("a lamp please"), *_answer("item notebook red")],
    },
    {
        "prompt": [*_user("order mugs"), *_answer("how many?"), *_user("three, red, friday")],
        "chosen": _answer("mugs, red, 3, friday"),
        "rejected": _answer("customer order friday please send the blue notebook to the city"),
    },
    {"prompt": _user("city?"), "chosen": _answer("leeds"), "rejected": _answer("the customer did not say")},
]
KTO = [
    {"prompt": _user("send two blue mugs to leeds"), "completion": _answer("order: mugs, 2, leeds"), "label": True},
    {"prompt": _user("a lamp please"), "completion": _answer("item notebook red"), "label": False},
    {"prompt": _user("order mugs, red"), "completion": _answer("mugs, red"), "label": True},
    {"prompt": _user("city?"), "completion": _answer("the customer did not say, send it friday"), "label": False},
]


@pytest.fixture(scope="module")
def pairs(encoder, tmp_path_factory) -> list[PreferencePair]:
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)
    return read_preferences(path, encoder, 512).items


@pytest.fixture(scope="module")
def labeled(encoder, tmp_path_factory) -> list[LabeledAnswer]:
    path = write_jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", KTO)
    return read_preferences(path, encoder, 512).items


@pytest.fixture(scope="module")
def policy(tiny_model):
    """The tiny model with a fixed, non-zero LoRA adapter (B = 0 would make the policy its own reference)."""
    base = load_model(tiny_model, torch.float32, torch.device("cpu"))
    base.set_attn_implementation(NAME)  # packed rows on our side; TRL's padded rows fall back to SDPA
    cfg = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear", seed=0)
    model = add_lora(base, cfg).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 1.0)
    return model


@pytest.fixture(scope="module")
def reference(tiny_model):
    return load_model(tiny_model, torch.float32, torch.device("cpu")).eval()


# --- rows -> token ids ----------------------------------------------------------------------------------------


def test_each_answer_follows_the_generation_prompt_and_ends_at_its_turn_end(pairs, encoder, tokenizer):
    """Prompt tokens are exactly what generation is given; answers are the template's turns through <|im_end|>."""
    assert len(pairs) == len(PAIRS)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for pair, row in zip(pairs, PAIRS):
        prompt = row["prompt"] if "prompt" in row else row["chosen"][:-1]
        assert pair.prompt == encoder.prompt_ids(Example(messages=[*prompt, *_answer("x")]))
        for ids, side in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
            assert ids[-1] == end and end not in ids[:-1]
            assert tokenizer.decode(ids[:-1]) == row[side][-1]["content"]


def test_tokens_are_trl_s_up_to_the_end_of_turn(pairs, tokenizer, policy, reference, tmp_path):
    """TRL tokenizes prompt + answer whole; the same prompt and answer tokens, except that TRL's answers also hold
    what ChatML writes after <|im_end|> (a newline), which generation never produces."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=_args(DPOConfig, tmp_path, len(PAIRS)),
        train_dataset=Dataset.from_list([_explicit(row) for row in PAIRS]),
        processing_class=tokenizer,
    )
    for pair, trl in zip(pairs, trainer.train_dataset):
        assert trl["prompt_ids"] == pair.prompt
        for ours, theirs in ((pair.chosen, trl["chosen_ids"]), (pair.rejected, trl["rejected_ids"])):
            assert theirs[: len(ours)] == ours and tokenizer.decode(theirs[len(ours) :]) == "\n"


def _explicit(row):
    """A row with an implicit prompt as TRL's prompt / chosen / rejected columns."""
    if "prompt" in row:
        return row
    return {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}


def test_text_rows_are_raw_text_with_an_end_token(encoder, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "mugs to leeds?", "chosen": " yes", "rejected": " no"}])
    (pair,) = read_preferences(path, encoder, 64).items
    assert tokenizer.decode(pair.prompt) == "mugs to leeds?"
    assert tokenizer.decode(pair.chosen) == " yes<|im_end|>" and tokenizer.decode(pair.rejected) == " no<|im_end|>"


def test_max_length_cuts_prompts_from_the_left_and_drops_pairs_whose_answer_cannot_fit(encoder, pairs, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    longest = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    limit = longest + 3  # the pair with the longest answer keeps 3 prompt tokens; the others more
    fitted = read_preferences(path, encoder, limit)
    assert len(fitted.items) == len(pairs) and fitted.fit.truncated == len(pairs)
    for got, full in zip(fitted.items, pairs):
        assert (got.chosen, got.rejected) == (full.chosen, full.rejected)
        assert got.prompt == full.prompt[-(limit - max(len(full.chosen), len(full.rejected))) :]
    short = read_preferences(path, encoder, longest)  # the longest answer leaves no room for a prompt token
    dropped = [p for p in pairs if max(len(p.chosen), len(p.rejected)) >= longest]
    assert short.fit.dropped_too_long == len(dropped) == len(pairs) - len(short.items)
    assert short.fit.first_too_long == f"{path} line {pairs.index(dropped[0]) + 1}"
    assert short.rows == len(pairs)


def test_kl_pairs_rotate_answers_within_the_batch(labeled):
    kl = kl_pairs(labeled, 512)
    assert [k.prompt for k in kl] == [x.prompt for x in labeled]
    assert [k.completion for k in kl] == [x.completion for x in labeled[-1:] + labeled[:-1]]
    assert [x.label for x in labeled] == [r["label"] for r in KTO]


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": _user("hi"), "chosen": _answer("yes"), "rejected": _answer("yes")}, "the same answer"),
        ({"prompt": "hi", "chosen": _answer("yes"), "rejected": _answer("no")}, "both be text or both be lists"),
        ({"prompt": _user("hi"), "chosen": _answer("a") * 2, "rejected": _answer("b")}, "one assistant turn.*got 2"),
        ({"prompt": _user("hi"), "chosen": _user("a"), "rejected": _answer("b")}, "'prompt\\+chosen' has no assistant"),
        ({"prompt": [*_user("hi"), *_answer("yes")], "chosen": _user("a"), "rejected": _answer("b")}, "got a user"),
        ({"chosen": [*_user("hi"), *_answer("a")], "rejected": [*_user("ho"), *_answer("b")]}, "same conversation"),
        ({"prompt": _user("hi"), "chosen": _answer(" "), "rejected": _answer("no")}, "empty assistant turn"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ],
)
def test_bad_pairs_are_refused_with_file_and_line(encoder, tmp_path, row, problem):
    good = {"prompt": _user("hi"), "chosen": _answer("yes"), "rejected": _answer("no")}
    if isinstance(row["chosen"], str):
        good = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(BadRowError, match=f"^{tmp_path}/bad.jsonl line 2: .*{problem}") as info:
        read_preferences(path, encoder, 64)
    assert "\n" not in str(info.value)
    skipped = read_preferences(path, encoder, 64, skip_bad_rows=True)
    assert (len(skipped.items), skipped.bad_rows, skipped.rows) == (1, 1, 2)


def test_a_prompt_rendered_into_different_tokens_per_answer_is_refused(encoder, tmp_path, monkeypatch):
    """The Encoder renders a prompt from the turns before the answer alone, so only a template whose render changes
    from one call to the next (one that writes the date, at midnight) gives chosen and rejected different prompt
    tokens; simulated here by a render that changes its prompt's first token on its second call."""
    encode, calls = encoder.encode, []

    def drifting(example):
        sequences = encode(example)
        calls.append(example)
        if len(calls) == 2:
            sequences[-1].ids[0] += 1
        return sequences

    monkeypatch.setattr(encoder, "encode", drifting)
    row = {"prompt": _user("hi"), "chosen": _answer("yes"), "rejected": _answer("no thanks")}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(BadRowError, match="pairs.jsonl line 1: the chat template rendered the prompt into different"):
        read_preferences(path, encoder, 64)


def test_kto_labels_are_booleans(encoder, tmp_path):
    rows = [{"prompt": "hi", "completion": " yes", "label": "true"}, {"prompt": "hi", "completion": " no", "label": 1}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(BadRowError, match="kto.jsonl line 2: field 'label' must be true or false"):
        read_preferences(path, encoder, 64)


def test_a_file_that_is_not_preference_data_says_what_it_expected(encoder, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"input": "hi", "output": "yes"}])
    with pytest.raises(UserError, match="sft.jsonl line 1: not a preference row.*chosen, rejected"):
        read_preferences(path, encoder, 64)


# --- log-probabilities ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pairs", "labeled"])
def test_a_padded_pass_is_planned_as_the_rows_it_collates(kind, request):
    """A padded pass holds each item's two sequences as rows of the pass's longest sequence (chosen and rejected;
    KTO: the row and its mismatched pair), and the plan (the memory estimate, data inspect's padding) counts that."""
    from loratune.data.pairs import PairSet
    from loratune.data.plan import plan_for

    items = PairSet(request.getfixturevalue(kind), 512)
    cfg = TrainConfig(batch_size=2, gradient_accumulation_steps=2)
    plan = plan_for(cfg, items.lengths, items.target_counts, packing=False, pair_widths=items.pair_widths)
    for step in plan.epoch(0):
        for examples in plan.passes(step):
            shape, batch = plan.shape(examples), items.collate(examples, packing=False, pad_id=0, filler=False)
            assert (shape.rows, shape.tokens) == (batch.input_ids.shape[0], batch.input_ids.numel())


def test_sequences_are_summed_alike_padded_or_packed_with_filler(pairs, policy, monkeypatch):
    """Per-sequence sums and answer token counts do not depend on the layout: padded rows, or one packed row with
    a filler segment; nor on the path (the model's own logits, taken where logits are transformed)."""
    sequences = [s for p in pairs for s in p.sequences()]
    ids = [ids for ids, _ in sequences] * 2  # the targets: the answers, then every token (each sequence's first)
    labels = [labels for _, labels in sequences] + ids[: len(sequences)]
    with torch.no_grad():
        padded = sequence_logprobs(policy, collate_padded(ids, labels, pad_id=0))
        filled = collate_packed(ids, labels, pad_id=0)
        assert filled.padding > 0
        packed = sequence_logprobs(policy, filled)
        monkeypatch.setattr(preference, "_plain_head", lambda lm: False)
        logits = sequence_logprobs(policy, filled)
    answers = torch.tensor(
        [len(x) for p in pairs for x in (p.chosen, p.rejected)] + [len(x) - 1 for x in ids[: len(sequences)]]
    )
    for got in (packed, logits):
        assert torch.equal(got.counts, answers) and torch.equal(padded.counts, answers)
        torch.testing.assert_close(got.sums, padded.sums, rtol=1e-5, atol=0)


# --- parity with TRL ------------------------------------------------------------------------------------------


def _args(config, tmp_path, batch, **settings):
    return config(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=batch,
        max_length=None,
        **settings,
    )


def _batch(sequences):
    return collate_packed([ids for ids, _ in sequences], [labels for _, labels in sequences])


def _sums(model, sequences, reference=False, grad=False):
    """Ours: the sequences packed in one row; the reference is the model with its adapter off."""
    with model.disable_adapter() if reference else contextlib.nullcontext(), torch.set_grad_enabled(grad):
        return sequence_logprobs(model, _batch(sequences))


def _pair_logprobs(model, pairs, reference=False, grad=False) -> PairLogprobs:
    sequences = [p.sequences()[0] for p in pairs] + [p.sequences()[1] for p in pairs]
    return PairLogprobs.from_sequences(_sums(model, sequences, reference, grad))


PARITY = {}  # name -> worst relative difference seen, printed at the end of the module (pytest -s)


def _close(name, ours, theirs, scale=None):
    """Within RTOL of TRL's value, or of `scale` where the value is a small difference of large log-probabilities
    (a reward is beta times the difference of two sums of ~100 nats: fp32 rounding of the sums sets its error)."""
    ours, theirs = (torch.as_tensor(_values(x), dtype=torch.float64) for x in (ours, theirs))
    base = theirs.abs() if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    PARITY[name] = max(PARITY.get(name, 0.0), float(((ours - theirs).abs() / base).max()))
    assert ((ours - theirs).abs() <= RTOL * base).all(), f"{name}: ours {ours.tolist()}, TRL's {theirs.tolist()}"


def _values(x):
    return x.detach() if torch.is_tensor(x) else [float(v) for v in x] if isinstance(x, list) else x


@pytest.fixture(scope="module", autouse=True)
def _print_parity():
    yield
    print("\nparity with TRL (max relative difference):", json.dumps(PARITY, indent=1))


def _metrics(trainer, names):
    return [trainer._metrics["eval"][name][-1] for name in names]


def _dpo_features(pairs):
    return [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl_dpo_trainer(loss_type, pairs, tokenizer, policy, reference, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=_args(DPOConfig, tmp_path, len(pairs), loss_type=[loss_type], beta=0.1),
        train_dataset=Dataset.from_list([_explicit(PAIRS[0])]),
        processing_class=tokenizer,
    )
    loss_fn = dpo_loss if loss_type == "sigmoid" else ipo_loss
    logps, ref = _pair_logprobs(policy, pairs), _pair_logprobs(policy, pairs, reference=True)
    ours = loss_fn(logps, ref, beta=0.1)
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    for i in range(len(pairs)):  # one pair per batch: TRL's loss and rewards of that pair
        with torch.no_grad():
            loss = trainer._compute_loss(trainer.model, trainer.data_collator(_dpo_features(pairs[i : i + 1])), False)
        theirs = _metrics(trainer, names)
        _close(f"{loss_type} loss", ours.losses[i], loss)
        _close("dpo log-probs", [logps.chosen[i], logps.rejected[i]], theirs[3:])
        scale = 0.1 * max(logps.chosen[i].abs(), logps.rejected[i].abs())
        _close(
            f"{loss_type} rewards",
            [ours.chosen_rewards[i], ours.rejected_rewards[i], ours.margins[i]],
            theirs[:3],
            scale,
        )
        assert ours.accuracies[i] == _metrics(trainer, ["rewards/accuracies"])[0]
    # A whole batch, padded by TRL and packed by us: the loss and the adapter's gradients.
    trainable = [p for p in policy.parameters() if p.requires_grad]
    loss = trainer._compute_loss(trainer.model, trainer.data_collator(_dpo_features(pairs)), False)
    theirs = torch.autograd.grad(loss, trainable)
    mine = loss_fn(_pair_logprobs(policy, pairs, grad=True), ref, beta=0.1).losses.mean()
    _close(f"{loss_type} batch loss", mine, loss)
    for g_ours, g_theirs in zip(torch.autograd.grad(mine, trainable), theirs):
        _close(f"{loss_type} gradients", g_ours, g_theirs, g_theirs.abs().max())


def _cpo_features(pairs):
    """TRL's ORPO and CPO batches: prompt + answer ids, labels on the answer."""
    features = []
    for pair in pairs:
        row = {"prompt_input_ids": pair.prompt, "prompt_attention_mask": [1] * len(pair.prompt)}
        for side, (ids, labels) in zip(("chosen", "rejected"), pair.sequences()):
            row |= {f"{side}_input_ids": ids.tolist(), f"{side}_attention_mask": [1] * len(ids)}
            row[f"{side}_labels"] = labels.tolist()
        features.append(row)
    return features


def _reference_free_parity(trainer, pairs, ours, logps, prefix) -> list[dict]:
    """ORPO's and SimPO's loss, mean log-probabilities and rewards per pair against TRL's; TRL's metrics per pair."""
    out = []
    for i in range(len(pairs)):
        with torch.no_grad():
            batch = trainer.data_collator(_cpo_features(pairs[i : i + 1]))
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        out.append(metrics)
        _close(f"{prefix} loss", ours.losses[i], loss)
        means = [logps.chosen[i] / logps.chosen_tokens[i], logps.rejected[i] / logps.rejected_tokens[i]]
        _close(f"{prefix} mean log-probs", means, [metrics["logps/chosen"], metrics["logps/rejected"]])
        rewards = [ours.chosen_rewards[i], ours.rejected_rewards[i], ours.margins[i]]
        names = ["rewards/chosen", "rewards/rejected", "rewards/margins"]
        _close(f"{prefix} rewards", rewards, [metrics[n] for n in names], trainer.beta * max(map(abs, means)))
        assert ours.accuracies[i] == metrics["rewards/accuracies"]
    return out


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_orpo_equals_trl_orpo_trainer(pairs, tokenizer, policy, tmp_path):
    """TRL's NLL term covers the prompt's tokens too: ours is given that NLL here (see preference.py). The odds
    ratio term is also checked apart from the NLL: in the model's pairs (a random model's answers are unlikely, where
    log(1 - p) is nearly 0) and with mean log-probabilities near 0, on both sides of -log 2."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    trainer = ORPOTrainer(
        model=policy,
        args=_args(ORPOConfig, tmp_path, len(pairs), beta=0.1),
        train_dataset=Dataset.from_list([_explicit(PAIRS[0])]),
        processing_class=tokenizer,
    )
    logps = _pair_logprobs(policy, pairs)
    whole = _sums(policy, [(ids, ids) for ids, _ in (p.sequences()[0] for p in pairs)])  # every token a target
    chosen_nll = -whole.sums / whole.counts
    ours = orpo_loss(logps, chosen_nll, beta=0.1)
    metrics = _reference_free_parity(trainer, pairs, ours, logps, "orpo")
    _close("orpo odds ratio term", ours.losses - chosen_nll, [-0.1 * m["log_odds_ratio"] for m in metrics])
    chosen, rejected = torch.tensor([-0.05, -0.9, -0.3, -2.0]), torch.tensor([-0.6, -0.01, -1.5, -0.8])
    ones = torch.ones(4, dtype=torch.long)
    synthetic = orpo_loss(PairLogprobs(chosen, rejected, ones, ones), torch.zeros(4), beta=0.1)
    trl_terms, chosen_rewards, rejected_rewards, _, _ = trainer.odds_ratio_loss(chosen, rejected)
    _close("orpo odds ratio term (log-probs near 0)", synthetic.losses, -trl_terms)
    _close("orpo rewards (log-probs near 0)", synthetic.chosen_rewards, chosen_rewards)
    _close("orpo rewards (log-probs near 0)", synthetic.rejected_rewards, rejected_rewards)
    with torch.no_grad():
        loss, _ = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(_cpo_features(pairs)))
    # TRL averages the NLL over the batch's tokens, not per pair
    nll = -whole.sums.sum() / whole.counts.sum()
    _close("orpo batch loss", nll + (ours.losses - chosen_nll).mean(), loss)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_simpo_equals_trl_cpo_trainer_with_loss_type_simpo(pairs, tokenizer, policy, tmp_path):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    settings = dict(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5)  # cpo_alpha 0: SimPO alone
    trainer = CPOTrainer(
        model=policy,
        args=_args(CPOConfig, tmp_path, len(pairs), **settings),
        train_dataset=Dataset.from_list([_explicit(PAIRS[0])]),
        processing_class=tokenizer,
    )
    logps = _pair_logprobs(policy, pairs)
    ours = simpo_loss(logps, beta=2.0, gamma=0.5)
    _reference_free_parity(trainer, pairs, ours, logps, "simpo")
    with torch.no_grad():
        loss, _ = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(_cpo_features(pairs)))
    _close("simpo batch loss", ours.losses.mean(), loss)


def test_kto_equals_trl_kto_trainer(labeled, tokenizer, policy, reference, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    weights = dict(desirable_weight=1.0, undesirable_weight=1.5)
    trainer = KTOTrainer(
        model=policy,
        ref_model=reference,
        args=_args(KTOConfig, tmp_path, len(labeled), beta=0.1, **weights),
        train_dataset=Dataset.from_list(KTO),
        processing_class=tokenizer,
    )
    kl = kl_pairs(labeled, 512)
    answers, mismatched = [x.sequence() for x in labeled], [x.sequence() for x in kl]
    logps = _sums(policy, answers).sums
    estimate = kl_estimate(_sums(policy, mismatched).sums, _sums(policy, mismatched, reference=True).sums)
    labels = torch.tensor([x.label for x in labeled])
    ours = kto_loss(logps, _sums(policy, answers, reference=True).sums, labels, estimate, beta=0.1, **weights)
    features = [
        {"prompt_ids": x.prompt, "completion_ids": x.completion, "KL_completion_ids": k.completion, "label": x.label}
        for x, k in zip(labeled, kl)
    ]
    batch = trainer.data_collator(features)
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch, False)
    names = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins"]
    theirs = _metrics(trainer, names)
    _close("kto batch loss", ours.losses.mean(), loss)
    scale = 0.1 * logps.abs().max()
    _close(
        "kto kl and rewards",
        [ours.kl, ours.chosen_rewards.mean(), ours.rejected_rewards.mean(), ours.margin],
        theirs,
        scale,
    )
    assert ours.kl > 0  # else the floor would hide the KL term from the check
    for i, x in enumerate(labeled):  # row i alone, with the whole batch's mismatched pairs: the same KL term
        row = {k: v[i : i + 1] if not k.startswith("KL_") else v for k, v in batch.items()}
        with torch.no_grad():
            loss = trainer._compute_loss(trainer.model, row, False)
        _close("kto loss", ours.losses[i], loss)
        reward = _metrics(trainer, ["rewards/chosen" if x.label else "rewards/rejected"])
        _close("kto rewards", ours.rewards[i], reward[0], 0.1 * logps[i].abs())

"""Padding-free packing for ``chipo sft`` and ``chipo reward``: layout by hand, packed == padded (values and every
parameter gradient) on a tiny random Llama, the checked-once fallback, and both CLIs end to end."""

import json

import pytest
import torch
from transformers import LlamaForSequenceClassification, TrainingArguments

from chipo.cli.reward import main as reward_main
from chipo.cli.sft import main as sft_main
from chipo.data import PreferenceCollator
from chipo.data.sft import IGNORE_INDEX, SFTCollator
from chipo.io import read_jsonl
from chipo.toy import tiny_model_and_tokenizer
from chipo.train.reward import (
    RewardTrainer,
    packed_rewards,
    padded_rewards,
    pooled_columns,
    reward_packing_matches,
    score_head,
)
from chipo.train.sft import SFTTrainer, sft_packing_matches, unpack_sft_batch

# Three sequences: A = prompt [7, 8] + completion [10] (3 tokens), B = [9] + [11, 12, 13, 14] (5), C = [15] + [16] (2).
HAND = [{"prompt_input_ids": [7, 8], "completion_input_ids": [10]},
        {"prompt_input_ids": [9], "completion_input_ids": [11, 12, 13, 14]},
        {"prompt_input_ids": [15], "completion_input_ids": [16]}]


def test_packed_sft_collator_by_hand():
    """Capacity = the longest sequence, 5. First-fit decreasing: B (5) -> row 0; A (3): 5 + 3 > 5 -> row 1;
    C (2): row 0 full, row 1 3 + 2 = 5 -> row 1. Rows [B], [A, C], width 5:
        input_ids    [[9, 11, 12, 13, 14], [7, 8, 10, 15, 16]]
        position_ids [[0, 1, 2, 3, 4],     [0, 1, 2, 0, 1]]
    Labels, completion only: prompts -100, completions their ids, and every sequence's first token -100 (B's 9,
    A's 7, C's 15: C's first token must not be a target of A's last position):
        [[-100, 11, 12, 13, 14], [-100, -100, 10, -100, 16]]
    Labels with the prompt trained too: A's 8 becomes a target, C's 15 stays -100 (first token of C):
        [[-100, 11, 12, 13, 14], [-100, 8, 10, -100, 16]]
    pad_to_multiple_of=4 widens to 8: row 0 ends in 3 pads (id 0, positions 0, 1, 2, labels -100), row 1 in 3.
    single_row: one row B, A, C of width 10, positions [0..4, 0, 1, 2, 0, 1].
    """
    packed = SFTCollator(pad_token_id=0, packing=True)(HAND)
    assert set(packed) == {"input_ids", "position_ids", "labels"}  # no attention mask
    assert packed["input_ids"].tolist() == [[9, 11, 12, 13, 14], [7, 8, 10, 15, 16]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 11, 12, 13, 14], [-100, -100, 10, -100, 16]]
    full = SFTCollator(pad_token_id=0, completion_only_loss=False, packing=True)(HAND)
    assert full["labels"].tolist() == [[-100, 11, 12, 13, 14], [-100, 8, 10, -100, 16]]
    wide = SFTCollator(pad_token_id=0, pad_to_multiple_of=4, packing=True)(HAND)
    assert wide["input_ids"].tolist() == [[9, 11, 12, 13, 14, 0, 0, 0], [7, 8, 10, 15, 16, 0, 0, 0]]
    assert wide["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 0, 1, 2]]
    assert (wide["labels"][:, 5:] == IGNORE_INDEX).all()
    one = SFTCollator(pad_token_id=0, packing=True, single_row=True)(HAND)
    assert one["input_ids"].tolist() == [[9, 11, 12, 13, 14, 7, 8, 10, 15, 16]]
    assert one["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]
    # packing off: the padded layout, unchanged
    assert set(SFTCollator(pad_token_id=0)(HAND)) == {"input_ids", "attention_mask", "labels"}


def test_unpack_sft_batch_by_hand():
    """Sequences start where position_ids == 0, read row-major over the width-8 rows of the example above: B, row
    0's padding (3 tokens), A, C, row 1's padding (3). Padded width = max position + 1 = 5; padding rows have all
    labels -100, so the loss is that of the padded batch of A, B, C."""
    padded = unpack_sft_batch(SFTCollator(pad_token_id=0, pad_to_multiple_of=4, packing=True)(HAND))
    assert padded["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0],
                                                 [1, 1, 1, 0, 0]]
    assert padded["input_ids"].tolist() == [[9, 11, 12, 13, 14], [0] * 5, [7, 8, 10, 0, 0], [15, 16, 0, 0, 0],
                                            [0] * 5]
    assert padded["labels"].tolist() == [[-100, 11, 12, 13, 14], [-100] * 5, [-100, -100, 10, -100, -100],
                                         [-100, 16, -100, -100, -100], [-100] * 5]


def _sft_features(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_input_ids": torch.randint(5, 300, (1 + 3 * i % 7,), generator=g).tolist(),
             "completion_input_ids": torch.randint(5, 300, (1 + 5 * i % 13,), generator=g).tolist() + [2]}
            for i in range(n)]


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("completion_only", [True, False])
def test_packed_sft_loss_and_grads_equal_padded(attn, completion_only):
    """fp32: the model's mean token cross-entropy over the packed rows equals the padded batch's, and so does every
    parameter's gradient (1e-5): the same (position, target) pairs, each with attention over its own prefix."""
    model, _ = tiny_model_and_tokenizer()
    model.config._attn_implementation = attn
    features = _sft_features()
    padded = SFTCollator(pad_token_id=0, completion_only_loss=completion_only)(features)
    packed = SFTCollator(pad_token_id=0, completion_only_loss=completion_only, packing=True)(features)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # fewer positions: the point of packing
    # the token count the loss divides by (transformers counts labels[..., 1:]) is the same
    assert (packed["labels"][:, 1:] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    loss_padded = model(**padded, use_cache=False).loss
    loss_padded.backward()
    grads = _grads(model)
    loss_packed = model(**packed, use_cache=False).loss
    loss_packed.backward()
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-5, msg=n)


class _IgnoresPositions(torch.nn.Module):
    """A model that drops position_ids: it would attend across packed sequences."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.score = getattr(inner, "score", None)

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)


def _trainer(cls, model, tmp_path, tokenizer):
    # use_cache=True: Trainer copies it into model.config, and a KV cache would switch transformers' packed-sequence
    # masking off; SFTTrainer must run packed batches without one regardless. The toy tokenizer pads with 0, as the
    # batches here do (a model built in memory has no name to load its own tokenizer from).
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, use_cache=True)
    return cls(model=model, args=args, processing_class=tokenizer)


def test_sft_trainer_checks_once_and_falls_back(tmp_path):
    """SFTTrainer.compute_loss on a packed batch: with a Llama, the packed loss (run without a KV cache even though
    the config enables one: a cache would switch transformers' packed masking off) equals the padded loss; with a
    model that ignores position_ids it warns once and computes the padded loss from the unpacked rows."""
    model, tokenizer = tiny_model_and_tokenizer()
    features = _sft_features()
    padded = SFTCollator(pad_token_id=0)(features)
    packed = SFTCollator(pad_token_id=0, packing=True)(features)
    with torch.no_grad():
        expected = model(**padded).loss
    assert sft_packing_matches(model, packed)
    trainer = _trainer(SFTTrainer, model, tmp_path, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(packed)), expected, atol=1e-5, rtol=1e-5)
    assert trainer.packing_ok is True
    ignoring = _IgnoresPositions(model)
    trainer = _trainer(SFTTrainer, ignoring, tmp_path, tokenizer)
    with pytest.warns(UserWarning, match="different loss"), torch.no_grad():
        loss = trainer.compute_loss(ignoring, dict(packed))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert trainer.packing_ok is False
    with torch.no_grad():  # later batches: padded, no second check or warning
        torch.testing.assert_close(trainer.compute_loss(ignoring, dict(packed)), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ reward


def _reward_model(pad_token_id, attn="sdpa"):
    lm, tokenizer = tiny_model_and_tokenizer()
    config = lm.config
    config.num_labels, config.pad_token_id, config._attn_implementation = 1, pad_token_id, attn
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config), tokenizer


def _pairs(pad, eos, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = [{"prompt_input_ids": torch.randint(5, 300, (2 + i,), generator=g).tolist(),
                 "chosen_input_ids": torch.randint(5, 300, (1 + 7 * i,), generator=g).tolist() + [eos],
                 "rejected_input_ids": torch.randint(5, 300, (3 + (5 * i) % 11,), generator=g).tolist() + [eos],
                 "row": i} for i in range(n)]
    return PreferenceCollator(pad_token_id=pad)(features)


def test_pooled_columns_by_hand():
    """HF pools the rightmost token != pad: row [5, 6, 2, 0] (pad 0) -> column 2 (the EOS 2); with pad == EOS == 2,
    row [5, 6, 2, 2] (3 real tokens) -> column 1, the token before EOS; no pad id -> the last real token, 2."""
    ids, mask = torch.tensor([[5, 6, 2, 0]]), torch.tensor([[1, 1, 1, 0]])
    assert pooled_columns(ids, mask, 0).tolist() == [2]
    assert pooled_columns(torch.tensor([[5, 6, 2, 2]]), mask, 2).tolist() == [1]
    assert pooled_columns(ids, mask, None).tolist() == [2]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_packed_rewards_and_grads_equal_padded(attn, pad_is_eos):
    """fp32: r(x, y) from the score head at the pooled token of the packed rows equals the model's pooled logit on
    the padded rows (1e-5), also when pad == EOS (pooled token = the one before EOS); so do all parameter
    gradients of a random linear functional of the rewards."""
    pad, eos = (2, 2) if pad_is_eos else (0, 2)
    model, _ = _reward_model(pad, attn)
    batch = _pairs(pad, eos)
    coeff = torch.randn(batch["input_ids"].shape[0], generator=torch.Generator().manual_seed(1))
    padded = padded_rewards(model, batch)
    (padded * coeff).sum().backward()
    grads = _grads(model)
    packed = packed_rewards(model, batch, score_head(model), pad)
    (packed * coeff).sum().backward()
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_score_head_through_peft_wrapper():
    """A LoRA (peft, SEQ_CLS) reward model: ``score`` resolves to peft's wrapper of the head, which applies the
    trained copy (perturbed here, so the frozen original would give other rewards), and the packed rewards equal
    the wrapped model's padded ones."""
    peft = pytest.importorskip("peft")
    model, _ = _reward_model(0)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj",
                                                                                                   "v_proj"]))
    head = score_head(wrapped)
    assert type(head).__name__ == "ModulesToSaveWrapper"
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(0.5)
    batch = _pairs(0, 2)
    with torch.no_grad():
        torch.testing.assert_close(packed_rewards(wrapped, batch, head, 0), padded_rewards(wrapped, batch),
                                   atol=1e-5, rtol=1e-5)


def test_reward_trainer_checks_once_and_falls_back(tmp_path):
    """RewardTrainer.rewards: packed == padded for the Llama classifier (check passes); a model that ignores
    position_ids, or has no score head, warns once and gets the padded rewards."""
    model, tokenizer = _reward_model(0)
    batch = _pairs(0, 2)
    with torch.no_grad():
        expected = padded_rewards(model, batch)
        trainer = _trainer(RewardTrainer, model, tmp_path, tokenizer)
        assert trainer.packing  # TrainingArguments became a RewardConfig (as TRL's trainers convert it): packing on
        torch.testing.assert_close(trainer.rewards(model, batch), expected, atol=1e-5, rtol=1e-5)
        assert trainer.packing and trainer._packing_checked
        ignoring = _IgnoresPositions(model)
        assert reward_packing_matches(model, batch)
        with pytest.warns(UserWarning, match="different rewards"):
            assert not reward_packing_matches(ignoring, batch)
        trainer = RewardTrainer(model=ignoring, args=trainer.args, processing_class=tokenizer, packing=True)
        with pytest.warns(UserWarning, match="different rewards"):
            torch.testing.assert_close(trainer.rewards(ignoring, batch), expected, atol=1e-5, rtol=1e-5)
        assert not trainer.packing
        ignoring.score = None
        with pytest.warns(UserWarning, match="no 'score' head"):
            assert not reward_packing_matches(ignoring, batch)


# ------------------------------------------------------------------------------------------------ CLIs


def _losses(out):
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_sft_cli_packed_matches_padded(tiny_dir, tmp_path, recwarn):
    """Two steps of ``chipo sft`` with packing=true and packing=false from the same model, data and seed: the same
    batches, so the logged losses agree up to round-off (step 2 after one optimizer step on equal gradients)."""
    data = tmp_path / "sft.jsonl"
    words = "cat dog model policy reward summary post answer".split()
    data.write_text("".join(json.dumps({"prompt": f"why is the {w} {'long ' * i}?", "completion": f" {w} sat."})
                            + "\n" for i, w in enumerate(words)))
    runs = {}
    for packing in ("true", "false"):
        out = tmp_path / f"sft-{packing}"
        assert sft_main([f"model={tiny_dir / 'model'}", f"dataset={data}", f"output_dir={out}", "max_steps=2",
                         "per_device_train_batch_size=4", "learning_rate=3e-3", "logging_steps=1",
                         "disable_tqdm=true", "save_strategy=no", "warmup_ratio=0", f"packing={packing}"]) == 0
        assert f"packing: {packing}" in (out / "run_config.yaml").read_text()
        runs[packing] = _losses(out)
    assert len(runs["true"]) == 2
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-4)
    assert not [w for w in recwarn if "using padded rows" in str(w.message)]  # the packed run did pack


@pytest.mark.slow
def test_reward_cli_packed_matches_padded(tiny_dir, tmp_path, recwarn):
    """Two steps of ``chipo reward`` packed and padded: same batches, same Bradley-Terry losses up to round-off."""
    runs = {}
    for packing in ("true", "false"):
        out = tmp_path / f"rm-{packing}"
        assert reward_main([f"model={tiny_dir / 'model'}", f"dataset={tiny_dir / 'train.jsonl'}",
                            f"output_dir={out}", "max_steps=2", "per_device_train_batch_size=8",
                            "learning_rate=3e-3", "logging_steps=1", "disable_tqdm=true", "save_strategy=no",
                            f"packing={packing}"]) == 0
        assert f"packing: {packing}" in (out / "run_config.yaml").read_text()
        runs[packing] = _losses(out)
    assert len(runs["true"]) == 2
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-4)
    assert not [w for w in recwarn if "using padded rows" in str(w.message)]  # the packed run did pack

"""Cross-check against TRL: chipo's DPO equals TRL 1.x ``DPOTrainer``'s on identical token sequences.

Setup. One locally built tiny Llama (``chipo.toy``) is the reference pi_ref (seed 0) and another (seed 1, LM head
scaled by 20 so its next-token distributions are sharp) the policy, so the log-ratios are tens of nats and the
per-example losses spread over roughly [0.1, 6] (with policy == reference every DPO loss is log 2 and the check
would be vacuous). Both trainers get deep copies of the same two models, the same tokenizer, the same
standard-format rows (prompt / chosen / rejected), beta = 0.1 and max_length = 24 (short enough that some
responses are cut, so truncation is compared too). Everything is computed on fixed batches, outside any training
loop, so data order and optimizer state play no part.

What TRL 1.16 does (``trl/trainer/dpo_trainer.py``), and how the two pipelines are made to see the same tokens:

* Tokenization: TRL appends the EOS *text* to each completion, tokenizes ``prompt`` and ``prompt + completion``
  (plain ``tokenizer(text)``, so special tokens as the tokenizer adds them) and takes the completion to start where
  the two token lists diverge (``common_prefix_length``). chipo tokenizes prompt and response separately and
  appends ``eos_token_id``. The two agree exactly when the prompt ends on a token boundary that survives
  concatenation. ``toy_preference_rows`` prompts end in a space ("...short? "), which byte-level BPE merges into
  the first completion word when concatenated: TRL then drops that space token from the prompt and scores
  "Ġgood" where chipo scores "good" after a "Ġ" prompt token -- different sequences, different log-probs, by
  design on both sides. So (a) ``aligned_rows`` moves the space from the end of the prompt to the start of the
  responses, where both tokenizations agree token for token (asserted, on the collated tensors), and (b)
  ``test_losses_match_on_trl_tokenization`` feeds chipo TRL's own token ids for the unmodified toy rows.
* Truncation: TRL's collator keeps the first ``max_length`` tokens of ``prompt + completion`` (``keep_start``);
  chipo keeps the first ``max_length - len(prompt)`` response tokens. Identical while the prompt fits.
* Log-probs: TRL patches the model with a fused LM head (``add_fused_lm_head``) that, off Triton devices, scores
  every position in 32k-token chunks and zeroes the non-completion ones, then sums per sequence. chipo's
  ``fused`` path applies the LM head only at response positions (``chipo.logprobs.logprobs_from_hidden``);
  ``logits`` takes a chunked log-softmax of the full logits. Both are exact; they differ only in fp32 summation
  order and in the matmul shapes (so in BLAS blocking).
* Loss: TRL's ``sigmoid`` loss is ``-logsigmoid(beta * (logratio_chosen - logratio_rejected))`` averaged over the
  batch; chipo's ``dpo`` preset is the same function of the same four per-sequence log-probs. Further checks:
  TRL's ``ipo`` (log-ratios divided by completion length) against chipo's ``ipo``, TRL's ``alpha_divergence``
  link at f_alpha_divergence_coef = 0.8 against chipo's ``alpha`` preset, and TRL's RPO combination
  ``["sigmoid", "sft"]`` against chipo's ``sft_weight``.

Tolerances (fp32 on CPU). The two log-prob implementations differ only in summation order and matmul shapes (so
BLAS blocking); per-sequence log-probs are sums of at most 24 per-token values of a few nats (totals ~ -40..-200),
and padding differs between one-row and whole batches. Measured: |d logp| <= 1.6e-5 (a relative ~1e-7),
|d loss| <= 1.5e-6. We allow atol 1e-4 on log-probs and 2e-5 on losses (a loss is softplus(-beta * margin), with the
reference log-probs shared, so its error is at most beta * 2 * |d logp| = 2e-5 at the log-prob tolerance), and 1e-4
relative (plus 1e-6 absolute) on the parameter gradients of the batch-mean loss. A real difference -- a shifted
mask, a missing EOS, a dropped or merged token -- moves a log-prob by whole nats.

Runtime: 10-30 s on 2 CPU cores (no training loop; a few tiny trainers, a few dozen forward/backward passes).
"""

from __future__ import annotations

import copy

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from chipo.data import PreferenceCollator, prepare_preference_dataset  # noqa: E402
from chipo.toy import build_tiny_llama, build_tokenizer, toy_preference_rows  # noqa: E402
from chipo.train import PreferenceTrainer  # noqa: E402
from chipo.train.reference import compute_reference_logps  # noqa: E402

BETA = 0.1
MAX_LENGTH = 24
N_ROWS = 12
POLICY_HEAD_SCALE = 20.0
LOGP_TOL = {"rtol": 0.0, "atol": 1e-4}
LOSS_TOL = {"rtol": 0.0, "atol": 2e-5}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}


def aligned_rows(n: int = N_ROWS, seed: int = 3) -> list[dict]:
    """Toy rows with the prompt's trailing space moved to the start of each response (see module docstring)."""
    rows = []
    for row in toy_preference_rows(n, seed=seed):
        space = row["prompt"][len(row["prompt"].rstrip()):]
        rows.append({"prompt": row["prompt"].rstrip(), "chosen": space + row["chosen"],
                     "rejected": space + row["rejected"]})
    return rows


def _models(tokenizer):
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    policy = build_tiny_llama(len(tokenizer), seed=1, **kwargs)
    with torch.no_grad():  # sharpen the policy's next-token distributions: log-ratios of several nats per token
        policy.lm_head.weight.mul_(POLICY_HEAD_SCALE)
    return policy, build_tiny_llama(len(tokenizer), seed=0, **kwargs)


def _trl_trainer(policy, ref, tokenizer, rows, tmp_path, **config):
    options = {"loss_type": ["sigmoid"], **config}
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=BETA, max_length=MAX_LENGTH,
        per_device_train_batch_size=len(rows), precompute_ref_log_probs=True, bf16=False,
        gradient_checkpointing=False, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **options,
    )
    return trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)


def _chipo_trainer(policy, tokenizer, prepared, tmp_path, impl, loss_name="dpo", **loss_options):
    args = TrainingArguments(output_dir=str(tmp_path / f"chipo-{impl}"), report_to="none", use_cpu=True,
                             remove_unused_columns=False, per_device_train_batch_size=len(prepared), seed=0)
    return PreferenceTrainer(model=copy.deepcopy(policy), args=args, train_dataset=prepared,
                             data_collator=PreferenceCollator(pad_token_id=tokenizer.pad_token_id),
                             processing_class=tokenizer, loss_name=loss_name, beta=BETA, logprobs_impl=impl,
                             loss_options=loss_options)


def _trl_features(trainer) -> list[dict]:
    return [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]


def _in_chipo_order(features: list[dict], prepared) -> list[dict]:
    """TRL's prepared rows reordered to chipo's row order, matched by their token ids.

    Both pipelines are given the rows in the same order, but the comparison must not depend on TRL keeping it
    (one unexplained early failure of the row-by-row checks looked like a reordering); matching by content keeps
    every check exact. TRL truncates in its collator, chipo when preparing rows, so a chipo response must be a
    prefix of TRL's. A row TRL tokenized differently has no match, which fails loudly here.
    """
    def matches(f, r):
        return (f["prompt_ids"] == r["prompt_input_ids"]
                and f["chosen_ids"][:len(r["chosen_input_ids"])] == r["chosen_input_ids"]
                and f["rejected_ids"][:len(r["rejected_input_ids"])] == r["rejected_input_ids"])

    ordered = []
    for i, row in enumerate(prepared):
        found = [f for f in features if matches(f, row)]
        assert found, f"chipo row {i} has no TRL row with the same tokens"
        ordered.append(found[0])
    return ordered


def _trl_per_example(trainer, features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's own numbers per example: (loss [B] from ``compute_loss`` on one-row batches, policy chosen/rejected
    log-probs [B] from ``compute_ref_log_probs`` -- TRL's reference-side function, applied to the policy)."""
    losses, chosen, rejected = [], [], []
    with torch.no_grad():
        for feature in features:
            batch = trainer.data_collator([feature])
            losses.append(trainer.compute_loss(trainer.model, batch).detach())
            c, r = trainer.compute_ref_log_probs(trainer.model, batch)
            chosen.append(c)
            rejected.append(r)
    return torch.stack(losses), torch.cat(chosen), torch.cat(rejected)


def _with_ref(prepared, chosen, rejected):
    return prepared.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps",
                                                                              rejected.tolist())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    tmp_path = tmp_path_factory.mktemp("trl-crosscheck")
    tokenizer = build_tokenizer()
    policy, ref = _models(tokenizer)
    rows = aligned_rows()
    trl_trainer = _trl_trainer(policy, ref, tokenizer, rows, tmp_path)
    prepared, stats = prepare_preference_dataset(datasets.Dataset.from_list(rows), tokenizer, source="mem",
                                                 max_length=MAX_LENGTH)
    assert stats.truncated_responses > 0, "max_length should cut some responses so truncation is compared too"
    features = _in_chipo_order(_trl_features(trl_trainer), prepared)
    return {"tokenizer": tokenizer, "policy": policy, "ref": ref, "trl": trl_trainer, "features": features,
            "prepared": prepared, "tmp": tmp_path}


def test_identical_token_sequences(setup):
    """Collated batches agree exactly: ids, attention and response/completion masks, chosen rows first."""
    trl_batch = setup["trl"].data_collator(setup["features"])
    ours = PreferenceCollator(pad_token_id=setup["tokenizer"].pad_token_id)(list(setup["prepared"]))
    assert torch.equal(ours["input_ids"], trl_batch["input_ids"])
    assert torch.equal(ours["attention_mask"], trl_batch["attention_mask"])
    assert torch.equal(ours["response_mask"].long(), trl_batch["completion_mask"])


def test_reference_logps_match(setup):
    """chipo's precomputed reference log-probs equal those TRL's precompute_ref_log_probs stored."""
    collator = PreferenceCollator(pad_token_id=setup["tokenizer"].pad_token_id)
    trl_chosen = torch.tensor([f["ref_chosen_logps"] for f in setup["features"]])
    trl_rejected = torch.tensor([f["ref_rejected_logps"] for f in setup["features"]])
    for impl in ("fused", "logits"):
        chosen, rejected = compute_reference_logps(setup["ref"], setup["prepared"], collator, batch_size=5, impl=impl)
        torch.testing.assert_close(chosen, trl_chosen, **LOGP_TOL)
        torch.testing.assert_close(rejected, trl_rejected, **LOGP_TOL)


@pytest.mark.parametrize("impl", ["fused", "logits"])
def test_per_example_losses_and_policy_logps_match(setup, impl):
    """Per example, chipo's pair_losses / policy log-probs on the whole batch equal TRL's on one-row batches;
    batch means agree too (TRL's compute_loss on the whole batch)."""
    trl_trainer, features = setup["trl"], setup["features"]
    trl_losses, trl_chosen, trl_rejected = _trl_per_example(trl_trainer, features)
    spread = trl_losses.max() - trl_losses.min()
    assert spread > 1.0, "losses should spread (policy != reference), else the check is vacuous"

    prepared = _with_ref(setup["prepared"], torch.tensor([f["ref_chosen_logps"] for f in features]),
                         torch.tensor([f["ref_rejected_logps"] for f in features]))
    chipo = _chipo_trainer(setup["policy"], setup["tokenizer"], prepared, setup["tmp"], impl)
    batch = chipo.data_collator(list(prepared))
    with torch.no_grad():
        losses, metrics = chipo.pair_losses(chipo.model, batch)
        trl_mean = trl_trainer.compute_loss(trl_trainer.model, trl_trainer.data_collator(features))
    torch.testing.assert_close(metrics["logps/chosen"], trl_chosen, **LOGP_TOL)
    torch.testing.assert_close(metrics["logps/rejected"], trl_rejected, **LOGP_TOL)
    torch.testing.assert_close(losses, trl_losses, **LOSS_TOL)
    torch.testing.assert_close(losses.mean(), trl_mean, **LOSS_TOL)


def test_gradients_match(setup):
    """The gradient of the batch-mean loss w.r.t. every policy parameter agrees (same update direction)."""
    trl_trainer, features = setup["trl"], setup["features"]
    prepared = _with_ref(setup["prepared"], torch.tensor([f["ref_chosen_logps"] for f in features]),
                         torch.tensor([f["ref_rejected_logps"] for f in features]))
    chipo = _chipo_trainer(setup["policy"], setup["tokenizer"], prepared, setup["tmp"], "fused")
    trl_model = trl_trainer.model
    trl_model.zero_grad()
    trl_trainer.compute_loss(trl_model, trl_trainer.data_collator(features)).backward()
    chipo.model.zero_grad()
    chipo.pair_losses(chipo.model, chipo.data_collator(list(prepared)))[0].mean().backward()
    trl_grads = dict(trl_model.named_parameters())
    for name, param in chipo.model.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name].grad, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")
    trl_model.zero_grad()


def test_losses_match_on_trl_tokenization(setup):
    """Unmodified toy rows (prompts ending in a space): chipo fed TRL's token ids gives TRL's per-example losses.

    chipo's own tokenization of these rows differs from TRL's at the prompt/response boundary (see module
    docstring); this checks that the difference is only that, not the log-prob or loss computation."""
    rows = toy_preference_rows(N_ROWS, seed=4)
    trl_trainer = _trl_trainer(setup["policy"], setup["ref"], setup["tokenizer"], rows, setup["tmp"] / "raw")
    features = _trl_features(trl_trainer)
    ours, _ = prepare_preference_dataset(datasets.Dataset.from_list(rows), setup["tokenizer"], source="mem",
                                         max_length=MAX_LENGTH)
    assert ours[0]["prompt_input_ids"] != features[0]["prompt_ids"], "expected the boundary-merge difference"

    # TRL truncates in its collator; apply the same keep_start cut so chipo sees the same sequences.
    fed = []
    for i, f in enumerate(features):
        budget = MAX_LENGTH - len(f["prompt_ids"])
        fed.append({"row": i, "prompt_input_ids": f["prompt_ids"], "chosen_input_ids": f["chosen_ids"][:budget],
                    "rejected_input_ids": f["rejected_ids"][:budget], "ref_chosen_logps": f["ref_chosen_logps"],
                    "ref_rejected_logps": f["ref_rejected_logps"]})
    prepared = datasets.Dataset.from_list(fed)
    chipo = _chipo_trainer(setup["policy"], setup["tokenizer"], prepared, setup["tmp"], "fused")
    batch = chipo.data_collator(list(prepared))
    assert torch.equal(batch["input_ids"], trl_trainer.data_collator(features)["input_ids"])
    trl_losses, _, _ = _trl_per_example(trl_trainer, features)
    with torch.no_grad():
        losses, _ = chipo.pair_losses(chipo.model, batch)
    torch.testing.assert_close(losses, trl_losses, **LOSS_TOL)


# --- other TRL losses: IPO (length-normalised), the alpha-divergence link, the RPO "sft" term
def _variant(setup, name: str, trl_config: dict, loss_name: str, **loss_options):
    """A TRL trainer with ``trl_config`` and chipo's trainer for the same objective, on the aligned rows and
    TRL's precomputed reference log-probs; returns (trl trainer, its features in chipo order, chipo, batch)."""
    trl_trainer = _trl_trainer(setup["policy"], setup["ref"], setup["tokenizer"], aligned_rows(),
                               setup["tmp"] / name, **trl_config)
    features = _in_chipo_order(_trl_features(trl_trainer), setup["prepared"])
    prepared = _with_ref(setup["prepared"], torch.tensor([f["ref_chosen_logps"] for f in features]),
                         torch.tensor([f["ref_rejected_logps"] for f in features]))
    chipo = _chipo_trainer(setup["policy"], setup["tokenizer"], prepared, setup["tmp"] / name, "fused", loss_name,
                           **loss_options)
    return trl_trainer, features, chipo, chipo.data_collator(list(prepared))


def test_ipo_matches_trl_length_normalised(setup):
    """TRL 1.16's IPO divides each sequence's log-ratio by its completion length; chipo's ipo preset does the same
    by default, so per-example losses agree. IPO losses are (h - 1/(2 beta))^2 with 1/(2 beta) = 5, so a log-prob
    error e moves a loss by about 2 |h - 5| e / n: compare with a relative tolerance too."""
    trl_trainer, features, chipo, batch = _variant(setup, "ipo", {"loss_type": ["ipo"]}, "ipo")
    trl_losses, _, _ = _trl_per_example(trl_trainer, features)
    with torch.no_grad():
        losses, _ = chipo.pair_losses(chipo.model, batch)
    assert trl_losses.max() - trl_losses.min() > 1.0, "IPO losses should spread, else the check is vacuous"
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=2e-5)
    chipo.loss_options["length_normalize"] = False
    with torch.no_grad():
        summed, _ = chipo.pair_losses(chipo.model, batch)
    assert (summed - trl_losses).abs().max() > 1.0, "the summed form differs from TRL's (the check has teeth)"


def test_alpha_divergence_matches_trl(setup):
    """TRL's alpha_divergence f-DPO at f_alpha_divergence_coef = 0.8 (link (t^-0.2 - 1)/(-0.2)) equals chipo's
    alpha preset at alpha = 0.8; at 0.5 the old mirrored parameterisation agreed by accident, at 0.8 it would use
    a = 0.2 and differ by ~1e16. The policy's log-ratios reach -80 nats, so the link reaches -5 (e^16 - 1) and
    losses span 0 to ~3e6: fp32 round-off is relative there (measured 4e-6), hence rtol 1e-5."""
    config = {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.8}
    trl_trainer, features, chipo, batch = _variant(setup, "alpha", config, "alpha", alpha=0.8)
    trl_losses, _, _ = _trl_per_example(trl_trainer, features)
    with torch.no_grad():
        losses, _ = chipo.pair_losses(chipo.model, batch)
    assert trl_losses.max() - trl_losses.min() > 1.0
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=LOSS_TOL["atol"])


def test_sft_weight_matches_trl_rpo(setup):
    """TRL's loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5] (RPO) equals chipo's dpo with sft_weight = 0.5:
    the batch-mean loss (TRL's sft term is a batch-level token mean) and its parameter gradients."""
    config = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    trl_trainer, features, chipo, batch = _variant(setup, "sft", config, "dpo", sft_weight=0.5)
    trl_model = trl_trainer.model
    trl_model.zero_grad()
    trl_loss = trl_trainer.compute_loss(trl_model, trl_trainer.data_collator(features))
    trl_loss.backward()
    chipo.model.zero_grad()
    losses, _ = chipo.pair_losses(chipo.model, batch)
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-6, atol=LOSS_TOL["atol"])
    chipo.loss_options.pop("sft_weight")
    with torch.no_grad():
        plain, _ = chipo.pair_losses(chipo.model, batch)
    assert trl_loss.item() - plain.mean().item() > 1.0, "the sft term should be sizeable (NLL of a few nats/token)"
    trl_grads = dict(trl_model.named_parameters())
    for name, param in chipo.model.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name].grad, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")

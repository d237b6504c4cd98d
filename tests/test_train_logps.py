"""Sequence log-probs of a real (tiny) Llama: fused == logits path; length buckets == one padded forward."""

import pytest
import torch

from chipo.data import PreferenceCollator
from chipo.sequences import batch_sequence_logps, length_buckets
from chipo.toy import tiny_model_and_tokenizer


def _batch(tokenizer, n=6):
    g = torch.Generator().manual_seed(0)
    features = []
    for i in range(n):  # very different lengths, so buckets matter
        prompt = torch.randint(5, 300, (2 + i,), generator=g).tolist()
        chosen = torch.randint(5, 300, (1 + 7 * i,), generator=g).tolist()
        rejected = torch.randint(5, 300, (3 + (5 * i) % 11,), generator=g).tolist()
        features.append({"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected,
                         "row": i})
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(features)


def test_length_buckets_partition_and_choice():
    lengths = [5, 100, 6, 98, 7, 99, 5, 97]
    groups = length_buckets(lengths, 4)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert len(groups) == 2 and {lengths[i] for i in groups[0]} == {5, 6, 7}
    assert length_buckets([50] * 8, 4) == [list(range(8))]  # nothing to gain: one forward
    assert length_buckets(lengths, 1) == [sorted(range(8), key=lengths.__getitem__)]


@pytest.mark.parametrize("impl", ["fused", "logits"])
def test_buckets_equal_single_forward_values_and_grads(impl):
    model, tokenizer = tiny_model_and_tokenizer()
    batch = _batch(tokenizer)
    one = batch_sequence_logps(model, batch, impl, max_buckets=1)
    one.sum().backward()
    grads_one = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    many = batch_sequence_logps(model, batch, impl, max_buckets=4)
    many.sum().backward()
    torch.testing.assert_close(many, one, atol=1e-4, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_one[n], atol=1e-4, rtol=1e-4)


def test_fused_equals_logits_path():
    model, tokenizer = tiny_model_and_tokenizer()
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(batch_sequence_logps(model, batch, "fused"),
                                   batch_sequence_logps(model, batch, "logits"), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("reference", ["precomputed", "ref_model"])
def test_trainer_packing_equals_padding(tmp_path, reference):
    """PreferenceTrainer(packing=True): same per-pair losses, metrics and gradients as padded rows (fp32, 1e-5).

    With ``ref_model`` the reference log-probs go through the packed path too; precomputed ones are read as is.
    """
    from transformers import TrainingArguments

    from chipo.train import PreferenceTrainer

    model, tokenizer = tiny_model_and_tokenizer()
    batch = _batch(tokenizer)
    ref = None
    if reference == "ref_model":
        ref, _ = tiny_model_and_tokenizer(seed=1)
    else:
        batch["ref_chosen_logps"] = -torch.arange(6, dtype=torch.float32) * 7
        batch["ref_rejected_logps"] = -torch.arange(6, dtype=torch.float32) * 5
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    results = {}
    for packing in (False, True):
        model.zero_grad()
        trainer = PreferenceTrainer(model=model, args=args, loss_name="chipo", beta=0.1, ref_model=ref,
                                    padding_buckets=1, packing=packing)
        losses, metrics = trainer.pair_losses(model, batch)
        losses.sum().backward()
        assert trainer.packing is packing  # the first-batch check kept packing on
        results[packing] = (losses, metrics, {n: p.grad.clone() for n, p in model.named_parameters()})
    (l0, m0, g0), (l1, m1, g1) = results[False], results[True]
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m1["logps/chosen"], m0["logps/chosen"], atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-5, msg=n)

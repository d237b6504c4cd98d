"""The wiring between a ``PreferenceConfig`` and ``PreferenceTrainer``: data preparation, LoRA, the log-prob
implementation and the reference log-probs (cached on disk). Used by ``PreferenceTrainer`` when it is given raw
rows and by ``chipo train`` (``chipo.train.run``), which prepares everything before it writes anything."""

from __future__ import annotations

import logging
import os

import datasets as hf_datasets
from accelerate import PartialState

from chipo.config import ConfigError
from chipo.data import prepare_preference_dataset
from chipo.models import add_adapters, is_peft
from chipo.sequences import choose_logprobs_impl
from chipo.train.common import load_policy, trainer_datasets
from chipo.train.config import PreferenceConfig
from chipo.train.reference import cached_reference_logps

logger = logging.getLogger("chipo")


def prepare_rows(config: PreferenceConfig, tokenizer, dataset, source: str):
    """Validate and tokenize raw preference rows (any TRL format; a ``datasets.Dataset`` or a list of dicts)."""
    if isinstance(dataset, list):
        dataset = hf_datasets.Dataset.from_list(dataset)
    prepared, _ = prepare_preference_dataset(dataset, tokenizer, source=source, max_length=config.max_length,
                                                 max_prompt_length=config.max_prompt_length, num_proc=config.num_proc,
                                                 drop_ties=config.drop_ties)
    return prepared


def apply_lora(model, config: PreferenceConfig):
    from peft import LoraConfig

    targets = config.lora_modules
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_scaling_alpha, lora_dropout=config.lora_dropout_rate,
                      target_modules=target_modules, task_type="CAUSAL_LM")
    return add_adapters(model, lora, seed=config.seed)


def add_reference_logps(config: PreferenceConfig, model, datasets: dict, collator, impl: str) -> dict:
    """Attach ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, from the disk cache when possible."""
    state = PartialState()
    ref = load_policy(config, config.ref_model) if config.ref_model else model
    ref.to(state.device)
    settings = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length, "impl": impl,
                "dtype": str(next(ref.parameters()).dtype)}
    out = {}
    for name, dataset in datasets.items():
        # The main process computes and writes the cache; the others then read it.
        with state.main_process_first():
            chosen, rejected, hit = cached_reference_logps(
                ref, dataset, collator, config.ref_cache_dir, settings, batch_size=config.per_device_eval_batch_size,
                impl=impl, chunk_tokens=config.logprob_chunk, disable_adapter=is_peft(model) and not config.ref_model,
                desc=f"reference log-probs ({name})", progress=not config.disable_tqdm, packing=config.packing)
        logger.info("reference log-probs for %s: %s", name, "cache hit" if hit else "computed and cached")
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        out[name] = dataset.add_column("ref_rejected_logps", rejected.tolist())
    if ref is not model:
        del ref
    return out


def _shards_parameters() -> bool:
    """True under FSDP or DeepSpeed ZeRO-3 (set by ``accelerate launch``), where parameters are sharded."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")




def pick_logprobs_impl(config: PreferenceConfig, model, probe: dict) -> str:
    """``config.logprobs_impl``, with 'auto' resolved on a probe batch (``chipo.sequences.choose_logprobs_impl``)."""
    state = PartialState()
    requested = config.logprobs_impl
    if requested == "auto" and _shards_parameters():
        requested = "logits"  # the fused path reads the LM head weight outside forward, which sharding forbids
    impl = choose_logprobs_impl(model.to(state.device), {k: v.to(state.device) for k, v in probe.items()}, requested)
    logger.info("log-prob implementation: %s", impl)
    return impl


def setup_preference_run(config: PreferenceConfig, model, tokenizer, train_dataset, eval_dataset, collator,
                         peft_config=None, ref_model=None, quantization_config=None) -> dict:
    """Everything ``PreferenceTrainer`` needs beyond Trainer's arguments, from the config (module docstring).

    ``model`` may be a name/path (loaded here by ``load_policy``), ``train_dataset`` / ``eval_dataset`` raw rows in
    any TRL format (prepared here), None (read from ``config.dataset`` / ``config.eval_split``) or already
    prepared. Returns the model, datasets and the trainer's loss/reference settings.
    """
    import copy

    from chipo.data import lengths

    if model is None or isinstance(model, str):
        model = load_policy(config, model, quantization_config)
    if peft_config is not None:
        model = add_adapters(model, peft_config, seed=config.seed)
    elif config.lora and not is_peft(model):
        model = apply_lora(model, config)
    if config.gradient_checkpointing:
        model.config.use_cache = False
    train_dataset, eval_dataset = trainer_datasets(config, train_dataset, eval_dataset,
                                                   lambda rows, source: prepare_rows(config, tokenizer, rows, source))
    if train_dataset is None:
        raise ConfigError("train_dataset is required (or a config naming dataset)")
    probe = collator([train_dataset[i] for i in range(min(2, len(train_dataset)))])
    impl = pick_logprobs_impl(config, model, probe)
    splits = {"train": train_dataset, **({"eval": eval_dataset} if eval_dataset is not None else {})}
    if config.reference == "precompute" and "ref_chosen_logps" not in train_dataset.column_names:
        splits = add_reference_logps(config, model, splits, collator, impl)
    elif config.reference == "model" and ref_model is None:
        if config.ref_model:
            ref_model = load_policy(config, config.ref_model)
        elif not is_peft(model):
            ref_model = copy.deepcopy(model)
    if config.group_by_length and config.length_column_name not in splits["train"].column_names:
        splits["train"] = splits["train"].add_column(config.length_column_name, lengths(splits["train"]))
    return {"model": model, "train_dataset": splits["train"], "eval_dataset": splits.get("eval"),
            "ref_model": ref_model, "logprobs_impl": impl,
            "ref_adapter_disabled": is_peft(model) and config.reference == "model" and ref_model is None}

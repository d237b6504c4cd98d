"""The ``chipo train`` recipe: wire config -> data -> model -> reference -> PreferenceTrainer -> HF checkpoint.

Everything that can fail on bad input (config, tokenizer, data, output directory) is checked before the output
directory is created, so a rejected run leaves nothing behind. The final model is saved into a temporary
directory inside ``output_dir`` and renamed into place.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path

from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from chipo import rundir
from chipo.config import ConfigError, dump_yaml
from chipo.data import PreferenceCollator, lengths, load_preference_dataset, prepare_preference_dataset
from chipo.train.common import training_arguments
from chipo.train.config import TrainConfig
from chipo.train.io import atomic_write_text, move_contents
from chipo.train.logps import choose_logprobs_impl
from chipo.train.preference import PreferenceTrainer
from chipo.train.reference import cached_reference_logps

logger = logging.getLogger("chipo")


def load_tokenizer(name: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str):
    try:
        return AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None


def prepare_split(config: TrainConfig, tokenizer, source: str, split: str | None, limit: int | None = None):
    dataset = load_preference_dataset(source, split, max_rows=limit)
    prepared, stats = prepare_preference_dataset(dataset, tokenizer, source=source, max_length=config.max_length,
                                                 max_prompt_length=config.max_prompt_length, num_proc=config.num_proc,
                                                 drop_ties=getattr(config, "drop_ties", False))
    logger.info("%s[%s]: %s", source, split, stats)
    return prepared


def check_output_dir(config: TrainConfig) -> Path:
    out = Path(config.output_dir)
    rundir.check_output_path(out)  # not a file, not a dangling symlink
    if out.is_dir() and any(out.iterdir()) and not (config.overwrite_output_dir or config.resume_from_checkpoint):
        raise ConfigError(f"output_dir {out} is not empty; set overwrite_output_dir=true or resume_from_checkpoint")
    if config.resume_from_checkpoint and config.resume_from_checkpoint != "latest" \
            and not Path(config.resume_from_checkpoint).is_dir():
        raise ConfigError(f"resume_from_checkpoint {config.resume_from_checkpoint} is not a directory")
    return out


def apply_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def add_reference_logps(config: TrainConfig, model, datasets: dict, collator, impl: str) -> dict:
    """Attach ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, from the disk cache when possible."""
    state = PartialState()
    ref = load_causal_lm(config.ref_model) if config.ref_model else model
    ref.to(state.device)
    settings = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length, "impl": impl,
                "dtype": str(next(ref.parameters()).dtype)}
    out = {}
    for name, dataset in datasets.items():
        # The main process computes and writes the cache; the others then read it.
        with state.main_process_first():
            chosen, rejected, hit = cached_reference_logps(
                ref, dataset, collator, config.ref_cache_dir, settings, batch_size=config.per_device_eval_batch_size,
                impl=impl, chunk_tokens=config.logprob_chunk, disable_adapter=config.lora and not config.ref_model,
                desc=f"reference log-probs ({name})", progress=not config.disable_tqdm)
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


def run_training(config: TrainConfig) -> Path:
    """Train per ``config``; returns the output directory holding the final HF-format model."""
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    # TrainingArguments first: it initialises the (possibly distributed) accelerate state used below.
    # An eval_dataset given without eval_split is evaluated on its only split (split=None below).
    has_eval = bool(config.eval_split or config.eval_dataset)
    args = training_arguments(config, has_eval=has_eval)
    state = PartialState()
    with state.main_process_first():
        datasets = {"train": prepare_split(config, tokenizer, config.dataset, config.split, config.max_train_samples)}
        if has_eval:
            datasets["eval"] = prepare_split(config, tokenizer, config.eval_dataset or config.dataset,
                                             config.eval_split)
    out = check_output_dir(config)
    model = load_causal_lm(config.model)
    if config.gradient_checkpointing:
        model.config.use_cache = False
    if config.lora:
        model = apply_lora(model, config)

    # Nothing above touched the disk: from here on the run is valid and may write its directory.
    # rundir: lock output_dir, clean a killed run's leftovers, clear on overwrite, pick a complete checkpoint.
    run = rundir.open_run(out, config, resume=config.resume_from_checkpoint, overwrite=config.overwrite_output_dir,
                          is_main=state.is_main_process)
    if run.finished and rundir.final_model_saved(out):
        logger.info("%s already reached max_steps at %s: nothing to do", out, run.checkpoint)
        run.release()
        return out
    if state.is_main_process:
        atomic_write_text(out / "run_config.yaml", dump_yaml(config))
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    probe = collator([datasets["train"][i] for i in range(min(2, len(datasets["train"])))])
    requested = config.logprobs_impl
    if requested == "auto" and _shards_parameters():
        requested = "logits"  # the fused path reads the LM head weight outside forward, which sharding forbids
    impl = choose_logprobs_impl(model.to(state.device), {k: v.to(state.device) for k, v in probe.items()},
                                requested)
    logger.info("log-prob implementation: %s", impl)

    ref_model = None
    if config.reference == "precompute":
        datasets = add_reference_logps(config, model, datasets, collator, impl)
    elif config.ref_model:
        ref_model = load_causal_lm(config.ref_model)
    elif not config.lora:
        ref_model = copy.deepcopy(model)
    if config.group_by_length:
        datasets["train"] = datasets["train"].add_column("length", lengths(datasets["train"]))

    trainer = PreferenceTrainer(
        model=model, args=args, data_collator=collator,
        train_dataset=datasets["train"], eval_dataset=datasets.get("eval"), processing_class=tokenizer,
        callbacks=[rundir.MetricsLog(out / "metrics.jsonl")],
        loss_name=config.loss, beta=config.beta, loss_options=config.loss_options(), ref_model=ref_model,
        ref_adapter_disabled=config.lora and config.reference == "model" and not config.ref_model,
        logprobs_impl=impl, logprob_chunk=config.logprob_chunk, padding_buckets=config.padding_buckets,
    )
    if run.finished:  # killed while saving the final model: rebuild it from the last checkpoint, do not train
        trainer._load_from_checkpoint(run.checkpoint)
    else:
        trainer.train(resume_from_checkpoint=run.checkpoint)
    save_final_model(trainer, tokenizer, out, merge_lora=config.lora)
    if state.is_main_process:
        run.mark_finished()
    run.release()
    return out


def save_final_model(trainer: PreferenceTrainer, tokenizer, out: Path, merge_lora: bool) -> None:
    """Save an HF-format model (merged weights for LoRA, adapter in ``adapter/``) atomically into ``out``."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if merge_lora:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        move_contents(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

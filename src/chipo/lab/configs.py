"""Configs of the lab commands (``chipo lab generate-prefs | evaluate | sweep | report``, ``chipo demo``).

Each is a dataclass read like every chipo config (YAML file and/or ``key=value``, one-line errors, ``--help`` from
the field help). Shared pieces are mixins, so a default exists once: ``SamplingFields`` (how responses are sampled,
recorded with every number computed from samples) and ``GoldFields`` (the gold scorer).
"""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError, _field
from chipo.generation import SamplingSettings
from chipo.lab.protocol import DEMO_EXPERIMENTS, FULL_EXPERIMENTS

GOLD_HELP = ("Gold scorer: 'world' (the embedded world), 'world:DIR', a reward-model directory or hub name "
             "(AutoModelForSequenceClassification, one output), or 'module:function' "
             "(function(prompts, responses) -> list of floats).")


@dataclass
class SamplingFields:
    """How responses are sampled (ancestral sampling from the policy itself by default)."""

    max_new_tokens: int = _field(64, "Sampling: max new tokens per response.")
    temperature: float = _field(1.0, "Sampling temperature (1: samples from the policy itself).")
    top_p: float = _field(1.0, "Sampling nucleus (1: off).")
    top_k: int = _field(0, "Sampling top-k (0: off).")
    sample_seed: int = _field(1234, "Base seed of sampling (a sweep adds the run seed).")
    sampling_batch_size: int = _field(256, "Sequences per generate() call.")

    def sampling(self, offset: int = 0) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, seed=self.sample_seed + offset,
                                batch_size=self.sampling_batch_size)

    def check_sampling(self) -> None:
        if self.max_new_tokens < 1 or self.sampling_batch_size < 1:
            raise ConfigError("max_new_tokens and sampling_batch_size must be at least 1")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be positive and top_p in (0, 1]")


@dataclass
class GoldFields:
    gold: str = _field("world", GOLD_HELP)
    gold_template: str | None = _field(None, "For a hub reward model trained on another text format: the text it "
                                             "scores, e.g. '{prompt}\\n{response}'. null: prompt and response "
                                             "tokenized as `chipo reward` trains (chipo.rewards).")


def _require(config, *names: str) -> None:
    for name in names:
        if not getattr(config, name):
            raise ConfigError(f"{name} is required")


@dataclass
class GeneratePrefsConfig(GoldFields, SamplingFields):
    """Preference pairs by the data process of Huang et al. 2024: two samples of pi_ref per pair, ordered by a
    Bradley-Terry draw with the gold reward, P[y1 > y2] = sigmoid(scale (r(y1) - r(y2)))."""

    policy: str = _field(None, "pi_ref: HF causal LM directory or hub name.")
    prompts: str = _field(None, "Prompt dataset (jsonl/json/parquet/arrow/dir/hub) with a 'prompt' column.")
    out: str = _field(None, "Output .jsonl (standard prompt/chosen/rejected rows + gold rewards); a .meta.json "
                            "beside it records the settings.")
    split: str = _field("train", "Split of `prompts`.")
    max_prompts: int | None = _field(None, "Use the first N prompts.")
    pairs_per_prompt: int = _field(1, "Preference pairs per prompt.")
    scale: float = _field(1.0, "Bradley-Terry scale s on the gold reward.")

    def __post_init__(self) -> None:
        _require(self, "policy", "prompts", "out")
        self.check_sampling()
        if self.pairs_per_prompt < 1 or not self.scale > 0:
            raise ConfigError("pairs_per_prompt must be at least 1 and scale positive")


@dataclass
class EvaluateConfig(GoldFields, SamplingFields):
    """Gold reward, win rates vs pi_ref and references, KL / chi-squared, length and implicit-reward accuracy."""

    policy: str = _field(None, "Policy: HF causal LM directory or hub name.")
    ref: str = _field(None, "pi_ref: HF causal LM directory or hub name.")
    prompts: str = _field(None, "Held-out prompts ('prompt', optional 'reference' column).")
    split: str = _field("train", "Split of `prompts` and `heldout_prefs`.")
    max_prompts: int | None = _field(None, "Use the first N prompts.")
    heldout_prefs: str | None = _field(None, "Held-out preference pairs (implicit-reward accuracy).")
    loss: str = _field("chipo", "Loss whose implicit reward is scored on `heldout_prefs`.")
    beta: float | None = _field(None, "beta of the implicit reward (null: no implicit-reward accuracy).")
    num_samples: int = _field(16, "Samples per prompt.")
    exact: bool = _field(True, "Exact metrics when the gold scorer has an enumerable response space (world).")
    out: str | None = _field(None, "Write the metrics as JSON here (default: print them).")

    def __post_init__(self) -> None:
        _require(self, "policy", "ref", "prompts")
        self.check_sampling()
        if self.num_samples < 1:
            raise ConfigError("num_samples must be at least 1")


@dataclass
class ReportConfig:
    """report.md, plots and results.json/csv from a sweep directory."""

    sweep_dir: str = _field(None, "Directory holding results.jsonl.")
    out: str | None = _field(None, "Report directory (default: SWEEP_DIR/report).")

    def __post_init__(self) -> None:
        _require(self, "sweep_dir")


@dataclass
class DemoConfig:
    """The overoptimization experiments on the embedded world: pi_ref by SFT (cached), preference data from pi_ref
    with gold Bradley-Terry labels, DPO and chiPO over two betas, several epochs and seeds, evaluation, report.md
    with plots. Rerunning resumes finished runs."""

    quick: bool = _field(False, "Smoke-test size of every experiment: offline 1 seed, 4 epochs, 8 held-out prompts "
                                "x 16 samples (offline alone measured: 30 CPU-s in all processes, 22 s on 2 idle "
                                "cores). No claim can be tested with 1 seed.")
    full: bool = _field(False, "Also standard RLHF (reward model + RL with kl and chi2mix), best-of-n and "
                               "inference-time pessimism, and online DPO / chiPO, XPO and chi-squared XPO, on the same "
                               "world and data: experiments offline, rlhf, online.")
    experiments: list[str] | None = _field(None, "Experiments to run, in order, each after those it needs (default: "
                                                 "offline; --full: offline, rlhf, online). The lab's: offline, rlhf, "
                                                 "online, methods, monitor-validation.")
    ablations: bool = _field(False, "Also DPO and chiPO each with RPO's SFT term (sft_weight 1) and with a reward "
                                    "bound (r_max / 2), and report which remedy moves which number (3x the runs).")
    out: str = _field("chipo-demo", "Output directory.")
    overwrite: bool = _field(False, "Clear what an earlier run wrote in each experiment's directory and start it "
                                    "again (without it, a directory made with other settings is refused and a "
                                    "finished one is reused).")
    seeds: int | None = _field(None, "Number of seeds of the offline sweep (default 8: enough for about 2 standard "
                                     "deviations of the per-seed differences to pass Holm's correction with 80% "
                                     "power; quick: 1).")
    betas: list[float] | None = _field(None, "beta values of the offline sweep (default 0.05, 0.005: the paper's "
                                             "Table 1).")
    epochs: int | None = _field(None, "Epochs of each offline run (default 16, evaluated at 1, 2, 4, 8, 16; quick: "
                                      "4).")
    workers: int = _field(2, "Parallel training processes.")
    world_cache: str | None = _field(None, "World cache directory (default $CHIPO_CACHE/world or "
                                           "~/.cache/chipo/world).")
    progress: bool = _field(True, "Show progress bars.")

    def __post_init__(self) -> None:
        if self.seeds is not None and self.seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {self.seeds}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.betas is not None and (not self.betas or any(not b > 0 for b in self.betas)):
            raise ConfigError(f"betas must be positive numbers, got {self.betas}")
        if self.full and self.experiments:
            raise ConfigError("give either --full or experiments=, not both")
        if self.experiments is not None and not self.experiments:
            raise ConfigError("experiments: name at least one")
        from chipo.lab.experiments import check_names

        check_names(self.experiment_names())

    def experiment_names(self) -> list[str]:
        if self.experiments:
            return [str(name) for name in self.experiments]
        return list(FULL_EXPERIMENTS if self.full else DEMO_EXPERIMENTS)

    def offline_changes(self) -> dict:
        """The offline sweep's sizes set by this config (the others keep the protocol's or quick()'s)."""
        changes = {"seeds": self.seeds, "betas": tuple(self.betas) if self.betas else None, "epochs": self.epochs}
        return {"ablations": self.ablations, **{k: v for k, v in changes.items() if v is not None}}


# ---------------------------------------------------------------------------------------------------- variants

VARIANT_OPTIONS = ("r_max", "clip_margin", "link", "label_smoothing", "alpha", "length_normalize", "sft_weight",
                   "reward_bound")
"""``PreferenceConfig`` fields a sweep variant may set (the options of ``chipo.losses.preference_loss``)."""


@dataclass(frozen=True)
class Variant:
    """One method of a sweep: a name, a loss preset and loss options (e.g. ``chipo+sft``: chipo, sft_weight 1)."""

    name: str
    loss: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def option_dict(self) -> dict:
        return dict(self.options)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.loss}" + (f" with {opts}" if opts else "")


def _variant(name: str, loss: str, options: dict, where: str) -> Variant:
    from chipo.losses import loss_names

    if not name or any(c in name for c in " /\\:"):
        raise ConfigError(f"variants: {where}: a name must be non-empty without spaces, '/', '\\' or ':', got {name!r}")
    if loss not in loss_names():
        raise ConfigError(f"variants: {where}: unknown loss {loss!r}; valid: {', '.join(loss_names())}")
    unknown = sorted(set(options) - set(VARIANT_OPTIONS))
    if unknown:
        raise ConfigError(f"variants: {where}: unknown option(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(VARIANT_OPTIONS)}")
    return Variant(name, loss, tuple(sorted(options.items())))


def parse_variants(value) -> list[Variant]:
    """Variants from a YAML mapping ``name -> {loss: L, key: value, ...}`` (or ``{loss: L, options: {...}}``) or
    from strings ``"name:loss:key=value,key=value"`` (``"name:loss"``, or just ``"loss"``).

    A comma-separated command-line list splits ``key=value,key=value`` apart; pieces without ':' that hold '='
    are joined back onto the variant before them. Values are YAML scalars (``sft_weight=1``, ``r_max=null``)."""
    from chipo.config import parse_yaml

    out: list[Variant] = []
    if isinstance(value, dict):
        for name, spec in value.items():
            if not isinstance(spec, dict) or "loss" not in spec:
                raise ConfigError(f"variants: {name}: expected a mapping with a 'loss' key, got {spec!r}")
            spec = dict(spec)
            loss = str(spec.pop("loss"))
            options = dict(spec.pop("options", None) or {}, **spec)
            out.append(_variant(str(name), loss, options, str(name)))
    else:
        items: list[str] = []
        for piece in (value if isinstance(value, list) else [value]):
            piece = str(piece).strip()
            if ":" not in piece and "=" in piece and items:
                items[-1] += "," + piece
            elif piece:
                items.append(piece)
        for item in items:
            parts = item.split(":", 2)
            name, loss = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
            options = {}
            for pair in (parts[2].replace(";", ",").split(",") if len(parts) == 3 else []):
                if not pair.strip():
                    continue
                key, eq, text = pair.partition("=")
                if not eq:
                    raise ConfigError(f"variants: {item!r}: expected key=value, got {pair!r}")
                options[key.strip()] = parse_yaml(text.strip())
            out.append(_variant(name.strip(), loss.strip(), options, repr(item)))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"variants: duplicate names in {names}")
    return out

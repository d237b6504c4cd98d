"""``chipo``: train, demo, lab and bandit commands.

Every user error (bad config, bad data, unknown loss) is printed as one line ``chipo: error: ...`` with exit
code 2; internal failures keep their traceback. NaN/inf during training exits with code 3.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from chipo import __version__

COMMANDS = {
    "train": ("chipo.cli.train:main", "Preference-train a causal LM (chiPO, DPO, IPO, ...) from YAML + key=value."),
    "sft": ("chipo.cli.sft:main", "Supervised fine-tuning (prompt/completion or messages), loss on completions only."),
    "reward": ("chipo.cli.reward:main", "Train a Bradley-Terry reward model (HF sequence classifier)."),
    "rl": ("chipo.cli.rl:main", "Online RL (RLOO) against a reward, regularized by kl, chi2 or chi2mix."),
    "online": ("chipo.cli.online:main", "Online preference optimization with a judge: online DPO/chiPO, XPO, Nash-MD."),
    "judge": ("chipo.cli.judge:main", "Pairwise win rate of a over b by an LLM (OpenAI-compatible) or reward model."),
    "demo": ("chipo.cli.lab:demo", "Watch DPO and chiPO overoptimize (or not) on an embedded world (CPU, minutes)."),
    "lab": ("chipo.cli.lab:main", "Overoptimization lab: generate preference data, evaluate, sweep, report."),
    "tldr": ("chipo.cli.tldr:main", "The paper's TL;DR experiment: sft, sweep, generate, judge, report, cost."),
    "bandit": ("chipo.cli.bandit:main", "The exact tabular testbed: regret, bound, overoptimization, online, bench."),
}


def _usage() -> str:
    lines = [f"chipo {__version__}: language-model post-training that does not overoptimize.", "",
             "usage: chipo <command> [args]   (chipo <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``chipo <command> ...``; ``argv=None`` (the console script, ``python -m chipo.cli.main``) means this
    process ends when it returns, so its exit skips the interpreter's collection of every live object
    (``_exit_without_full_collections``)."""
    if argv is None:
        try:
            return _run(sys.argv[1:])
        finally:
            _exit_without_full_collections()
    return _run(list(argv))


def _exit_without_full_collections() -> None:
    """Collect this command's garbage now, then freeze every remaining object out of the cyclic GC.

    At exit, CPython tears modules down and runs full garbage collections over every object still alive: after
    importing torch and transformers (~400k objects) that took 1.3-1.8 s of a ``chipo rl`` process on the 2-core
    development machine, work whose only result is memory the OS reclaims anyway. ``gc.collect()`` first finalizes
    the command's own garbage exactly as those collections would have; ``gc.freeze()`` then moves what is left
    (modules and what they hold) to the permanent generation, which collections skip. Objects are still released
    by reference counting as modules are cleared, and ``atexit`` handlers (logging, trackers, ``weakref.finalize``)
    still run; only reference cycles among module-level objects are not finalized, which Python never guaranteed
    at exit.
    """
    import gc

    gc.collect()
    gc.freeze()


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"chipo: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    target, _ = COMMANDS[argv[0]]
    entry, *prefix = target.split()  # "module:function [leading args]"
    module, func = entry.split(":")
    return int(getattr(importlib.import_module(module), func)([*prefix, *argv[1:]]) or 0)


def _interrupted_line(output_dir: str | None, argv: list[str] | None) -> str:
    """One line for Ctrl-C: where the last complete checkpoint is and the command that resumes from it."""
    import shlex

    if not output_dir:
        return "chipo: interrupted"
    from chipo.train.rundir import latest_complete_checkpoint

    latest = latest_complete_checkpoint(output_dir)
    if latest is None:
        return f"chipo: interrupted; no checkpoint in {output_dir} yet (rerun the command to start over)"
    again = [a for a in (argv or []) if not a.startswith("resume_from_checkpoint=")]
    resume = shlex.join(["chipo", *again, "resume_from_checkpoint=latest"])
    return f"chipo: interrupted; last checkpoint: {latest}; resume with: {resume}"


def run_guarded(fn, *args, output_dir=None, argv: list[str] | None = None) -> int:
    """Run ``fn``; user errors become one line on stderr and exit code 2 (3 for non-finite training, 130 for
    Ctrl-C, which names the last checkpoint and the command that resumes; ``output_dir`` may be a callable giving
    it once known)."""
    from chipo.config import ConfigError
    from chipo.data import DataError

    try:
        fn(*args)
    except (ConfigError, DataError) as e:
        print(f"chipo: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # NonFiniteError (a RuntimeError) lives with the trainers (torch, transformers): looked up only once
        # something raised, so commands that never train (chipo judge with an LLM) do not import them.
        pairwise = sys.modules.get("chipo.train.pairwise")  # imported by whatever raised a NonFiniteError
        if pairwise is None or not isinstance(e, pairwise.NonFiniteError):
            raise
        print(f"chipo: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        where = output_dir() if callable(output_dir) else output_dir
        print(_interrupted_line(where, argv), file=sys.stderr)
        return 130
    except OSError as e:  # read-only or full disk, permissions: the OS's reason and the path, not a traceback
        path = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"chipo: error: {e.strerror or e}{path}", file=sys.stderr)
        return 2
    return 0


def build_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def config_command(argv: list[str], *, prog: str, description: str, example: str, config_cls: type,
                   runner: str, saved: str | None = None, groups: dict[str, type] | None = None) -> int:
    """A ``<prog> --config run.yaml key=value ...`` command: parse, build ``config_cls``, call ``runner``.

    ``runner`` is "module:function" (imported only when the command runs, so ``--help`` stays fast); it takes the
    config and returns the output path, reported as "chipo: <saved> saved to <path>" when ``saved`` is given.
    Keys may also be given as ``--key value`` / ``--key=value``, a bool key as ``--key`` or ``--no-key``
    (``chipo.config.cli_overrides``).
    """
    from chipo.config import ConfigError, cli_overrides, config_help, load_config

    epilog = example + ("\nconfig keys (YAML file and/or key=value, --key value or --key=value; values parsed as "
                        "YAML scalars; a bool key also as --key / --no-key):\n")
    parser = build_parser(prog, description, epilog + config_help(config_cls, groups))
    parser.add_argument("--config", help="YAML file of config keys (key=value and --key value arguments override it)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    try:
        normalized = cli_overrides(argv, config_cls)
    except ConfigError as e:
        print(f"chipo: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(normalized)

    loaded: dict = {}

    def _run() -> None:
        module, func = runner.split(":")
        loaded["config"] = config = load_config(config_cls, args.config, args.overrides)
        out = getattr(importlib.import_module(module), func)(config)
        if saved:
            print(f"chipo: {saved} saved to {out}")

    command = prog.split()[1:]
    return run_guarded(_run, output_dir=lambda: getattr(loaded.get("config"), "output_dir", None),
                       argv=[*command, *argv])


if __name__ == "__main__":
    sys.exit(main())

"""``chipo judge``: pairwise win rate of responses ``a`` against ``b`` with an LLM or reward-model judge.

Inputs, either form (any file ``chipo train`` reads: .jsonl, .json, .parquet, a saved dataset, a hub name):

- ``--pairs F``: one row per item with a prompt and both responses (columns ``prompt``, ``a``, ``b``; rename with
  ``--prompt-field``, ``--a-field``, ``--b-field``);
- ``--a FA --b FB``: two files of samples, row i of each answering the same prompt (columns ``prompt`` and
  ``--response-field``, by default the first of ``completion``, ``response`` present); their prompts must agree.

Writes ``--output`` (JSON: counts, win rate of a with its standard error, the judge and its settings, key
redacted) and, with ``--details``, one JSON line per item (outcome, status, the judge's raw answer).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from chipo.cli.main import build_parser, run_guarded
from chipo.config import ConfigError, cli_overrides, config_help, load_config

EXAMPLE = """examples:
  # a local vLLM server: vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000
  chipo judge --a policy_samples.jsonl --b sft_samples.jsonl --judge openai --output winrate.json \\
      base_url=http://localhost:8000/v1 model=Qwen/Qwen2.5-7B-Instruct max_concurrency=16
  # a hosted API (key from OPENAI_API_KEY or CHIPO_JUDGE_API_KEY)
  CHIPO_JUDGE_MODEL=gpt-4o chipo judge --pairs pairs.jsonl --judge openai --output winrate.json
  chipo judge --pairs pairs.jsonl --judge reward-model model=runs/rm --output rm_winrate.json

judge keys (YAML file via --config and/or key=value or --key value), --judge openai:
{openai}

--judge reward-model:
{reward}
"""

RESPONSE_FIELDS = ("completion", "response")


def _epilog() -> str:
    from chipo.judges import OpenAIJudgeConfig, RewardModelJudgeConfig

    return EXAMPLE.format(openai=config_help(OpenAIJudgeConfig), reward=config_help(RewardModelJudgeConfig))


def main(argv: list[str]) -> int:
    from chipo.judges import JUDGE_CONFIGS, JudgeError

    parser = build_parser("chipo judge", "Pairwise win rate of responses a over b with an LLM or reward-model "
                                         "judge.", _epilog())
    parser.add_argument("--pairs", help="file with prompt, a and b per row")
    parser.add_argument("--a", dest="a_file", help="samples of system a (prompt + response per row)")
    parser.add_argument("--b", dest="b_file", help="samples of system b, row-aligned with --a")
    parser.add_argument("--split", default="train", help="split to read (directories, saved datasets, hub)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--a-field", default="a", help="response column of a in --pairs")
    parser.add_argument("--b-field", default="b", help="response column of b in --pairs")
    parser.add_argument("--response-field", default=None,
                        help=f"response column in --a/--b files (default: first of {', '.join(RESPONSE_FIELDS)})")
    parser.add_argument("--judge", required=True, choices=sorted(JUDGE_CONFIGS))
    parser.add_argument("--output", required=True, help="results JSON file")
    parser.add_argument("--details", help="per-item JSON lines file (outcome, status, raw answer)")
    parser.add_argument("--config", help="YAML file of judge keys (overridden by key=value)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="judge config overrides")
    judge = next((b for a, b in zip(argv, argv[1:]) if a == "--judge"),
                 next((a.partition("=")[2] for a in argv if a.startswith("--judge=")), None))
    if judge in JUDGE_CONFIGS:  # judge keys also as --key value / --key=value (chipo.config.cli_overrides)
        options = tuple(o[2:].replace("-", "_") for a in parser._actions for o in a.option_strings if o[:2] == "--")
        try:
            argv = cli_overrides(argv, JUDGE_CONFIGS[judge], passthrough=options)
        except ConfigError as e:
            print(f"chipo: error: {e}", file=sys.stderr)
            return 2
    args = parser.parse_intermixed_args(argv)

    def _judge() -> None:
        summary = run_judge(args)
        rate, err = summary["win_rate_a"], summary["stderr"]
        shown = "n/a" if rate is None else f"{rate:.3f}" + ("" if err is None else f" +- {err:.3f}")
        print(f"chipo: win rate of a: {shown} over {summary['valid']} of {summary['n']} items "
              f"({summary['malformed']} malformed, {summary['errors']} errors); results in {args.output}")

    try:
        return run_guarded(_judge)
    except JudgeError as e:
        print(f"chipo: error: {e}", file=sys.stderr)
        return 2


def run_judge(args) -> dict:
    """Load inputs and config (all checked before any request), judge, write the results; returns the summary."""
    from chipo.io import atomic_write_text
    from chipo.judges import JUDGE_CONFIGS, build_judge
    from chipo.judges.config import check_writable_file

    config = load_config(JUDGE_CONFIGS[args.judge], args.config, args.overrides)
    # A results path that cannot be written must fail now, not after every (paid) request has been made.
    check_writable_file(args.output, "--output")
    if args.details:
        check_writable_file(args.details, "--details")
    prompts, a, b, inputs = read_inputs(args)
    judge = build_judge(args.judge, config)
    try:
        result = judge.judge(prompts, a, b)
    finally:
        if hasattr(judge, "close"):
            judge.close()
    settings = config.public_dict() if hasattr(config, "public_dict") else dataclasses.asdict(config)
    client = getattr(judge, "client", None)
    summary = {"judge": judge.name, "kind": args.judge, **result.summary(),
               "requests": getattr(client, "requests", 0), "inputs": inputs, "settings": settings}
    atomic_write_text(args.output, json.dumps(summary, indent=2) + "\n")
    if args.details:
        rows = [{"index": i, "outcome": o, "status": s, "raw": r}
                for i, (o, s, r) in enumerate(zip(result.outcomes, result.status, result.raw, strict=True))]
        atomic_write_text(args.details, "".join(json.dumps(row) + "\n" for row in rows))
    return summary


def read_inputs(args) -> tuple[list[str], list[str], list[str], dict]:
    """(prompts, a, b, description of the inputs) from ``--pairs`` or ``--a``/``--b``."""
    if args.pairs and (args.a_file or args.b_file):
        raise ConfigError("give either --pairs or --a and --b, not both")
    if args.pairs:
        prompts, a, b = _columns(args.pairs, args.split, [args.prompt_field, args.a_field, args.b_field])
        return prompts, a, b, {"pairs": args.pairs}
    if not (args.a_file and args.b_file):
        raise ConfigError("give --pairs FILE, or both --a FILE and --b FILE")
    prompts, a = _columns(args.a_file, args.split, [args.prompt_field, args.response_field])
    prompts_b, b = _columns(args.b_file, args.split, [args.prompt_field, args.response_field])
    from chipo.data import DataError

    if len(prompts) != len(prompts_b):
        raise DataError(args.b_file, f"has {len(prompts_b)} rows but {args.a_file} has {len(prompts)}; "
                                     "row i of both must answer the same prompt")
    for i, (x, y) in enumerate(zip(prompts, prompts_b, strict=True)):
        if x != y:
            raise DataError(args.b_file, f"prompt differs from row {i} of {args.a_file}; the files must be "
                                         "row-aligned", row=i, field=args.prompt_field)
    return prompts, a, b, {"a": args.a_file, "b": args.b_file}


def _columns(source: str, split: str, fields: list[str | None]) -> list[list[str]]:
    """String columns ``fields`` of ``source`` (None: the first present of RESPONSE_FIELDS); one-line errors
    naming file, row (and line) and field."""
    from chipo.data import DataError, load_preference_dataset
    from chipo.data.formats import describe
    from chipo.data.origin import RowLocator

    dataset = load_preference_dataset(source, split)
    locator = RowLocator(dataset, source)
    names = []
    for field in fields:
        if field is None:
            field = next((f for f in RESPONSE_FIELDS if f in dataset.column_names), RESPONSE_FIELDS[0])
        if field not in dataset.column_names:
            raise DataError(source, f"missing column {field!r} (columns: {', '.join(dataset.column_names)})",
                            field=field)
        names.append(field)
    columns = []
    for field in names:
        values = dataset[field]
        for row, value in enumerate(values):
            if not isinstance(value, str):
                raise locator.error(f"expected a string, got {describe(value)}", row=row, field=field)
        columns.append(values)
    return columns

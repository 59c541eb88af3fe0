"""The ``evomerge`` command line (``python -m evomerge.cli``).

Exit codes: 0 success, 2 invalid usage or input (wrong flag combination,
missing path, invalid YAML or configuration), 3 the requested work failed
(a merge, an evaluation or a run), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from evomerge.exceptions import CheckpointNotFoundError, ConfigError, EvoMergeException

logger = logging.getLogger("evomerge.cli")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130

ACTIONS = ("run", "evaluate", "generate", "generate_config", "merge", "report")


class UsageError(EvoMergeException):
    """The command line combines flags that do not go together."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Merge fine-tunes of one base language model with an evolutionary tournament.",
        epilog=(
            "examples:\n"
            "  evomerge --run                          tournament on the default model family\n"
            "  evomerge --run --config my.yaml         tournament from a configuration file\n"
            "  evomerge --merge merge.yaml --output out/   one merge (EvoMerge or mergekit YAML)\n"
            "  evomerge --evaluate out/ --json         score one model folder\n"
            "  evomerge --generate out/ --prompt 'Hello'\n"
            "  evomerge --generate-config              write a configuration interactively\n"
            "  evomerge --report RUN_ID                redraw the charts and report of a past run\n\n"
            "exit codes: 0 success, 2 invalid usage or input, 3 the work failed, 130 interrupted"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_argument_group("actions (choose one)")
    actions.add_argument("--run", action="store_true", help="run a tournament through the Prefect flow")
    actions.add_argument("--evaluate", metavar="MODEL", help="score a model folder or Hub id")
    actions.add_argument("--generate", metavar="MODEL", help="generate text from a model folder or Hub id")
    actions.add_argument(
        "--generate-config", action="store_true", help="ask for models and settings, then write a configuration YAML"
    )
    actions.add_argument("--merge", metavar="CONFIG", help="run one merge from an EvoMerge or mergekit YAML")
    actions.add_argument("--report", metavar="RUN_ID", help="redraw the charts and HTML report of a past run")

    options = parser.add_argument_group("settings")
    options.add_argument("--config", metavar="FILE", help="tournament configuration YAML (--run, --report, --evaluate)")
    for index in (1, 2, 3):
        options.add_argument(
            f"--model{index}",
            metavar="PATH_OR_ID",
            help=f"input model {index} for --run: a local folder or Hub id; unset models keep the defaults",
        )
    options.add_argument("--use-cli", action="store_true", help="download Hub models with the 'hf' CLI before merging")
    options.add_argument("--prompt", help="prompt text for --generate")
    options.add_argument("--max-length", type=int, default=64, help="tokens to generate with --generate (default 64)")
    options.add_argument("--eval-text", action="append", metavar="FILE", help="text file for --evaluate (repeatable)")
    options.add_argument("--json", action="store_true", help="print --evaluate results as one JSON object")
    options.add_argument("--output", metavar="PATH", help="output folder of --merge, or YAML file of --generate-config")
    options.add_argument("--output-dir", metavar="DIR", help="folder for run charts and the report")
    options.add_argument("--seed", type=int, help="random seed of the search")
    options.add_argument("--run-id", help="run id for --run; an existing id resumes that run")
    options.add_argument(
        "--task-runner",
        choices=("thread", "dask", "ray"),
        help="where --run executes merges and evaluations: threads here, a Dask or a Ray cluster (default: runner.task_runner)",
    )
    options.add_argument("--address", help="scheduler address of an existing Dask or Ray cluster for --run (default: runner.address)")
    options.add_argument("--verbose", action="store_true", help="log DEBUG messages on the console")
    options.add_argument("--log-file", default="evomerge.log", help="rotating log file (default evomerge.log)")
    return parser


def chosen_action(args: argparse.Namespace) -> str:
    """Return the one action the arguments request, or raise ``UsageError``."""
    chosen = [name for name in ACTIONS if getattr(args, name)]
    if len(chosen) != 1:
        flags = ", ".join("--" + name.replace("_", "-") for name in ACTIONS)
        given = ", ".join("--" + name.replace("_", "-") for name in chosen) or "none"
        raise UsageError(f"choose exactly one action of {flags}; given: {given}")
    action = chosen[0]
    if action == "generate" and not args.prompt:
        raise UsageError("--generate needs --prompt TEXT")
    if args.prompt and action != "generate":
        raise UsageError("--prompt only goes with --generate")
    if action == "merge" and not args.output:
        raise UsageError("--merge needs --output DIR for the merged model")
    if any(getattr(args, f"model{i}") for i in (1, 2, 3)) and action != "run":
        raise UsageError("--model1/--model2/--model3 only go with --run")
    if (args.task_runner or args.address) and action != "run":
        raise UsageError("--task-runner and --address only go with --run")
    if (args.eval_text or args.json) and action != "evaluate":
        raise UsageError("--eval-text and --json only go with --evaluate")
    return action


def _model_name(path: str, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path.rstrip("/")).name or path).strip("-") or "model"
    candidate, suffix = name, 2
    while candidate in taken:
        candidate = f"{name}-{suffix}"
        suffix += 1
    return candidate


def apply_model_overrides(config, overrides: list[str | None]):
    """Replace the first models of ``config`` by the given paths or Hub ids; unset ones keep the defaults."""
    from evomerge.config import ModelReference

    models = list(config.models)
    for index, path in enumerate(overrides):
        if not path:
            continue
        taken = {model.name for i, model in enumerate(models) if i != index}
        reference = ModelReference(name=_model_name(path, taken), path=path)
        if index < len(models):
            models[index] = reference
        else:
            models.append(reference)
    data = config.model_dump(mode="json")
    data["models"] = [model.model_dump(mode="json") for model in models]
    if data["merge"].get("base_model") not in {model.name for model in models}:
        data["merge"]["base_model"] = None
    from evomerge.config import config_from_dict

    return config_from_dict(data, source="command line")


def download_with_hf_cli(config) -> None:
    """Download every Hub model of ``config`` with the Hugging Face CLI into the local cache."""
    executable = shutil.which("hf") or shutil.which("huggingface-cli")
    if executable is None:
        raise UsageError("--use-cli needs the Hugging Face CLI ('hf'): install it with pip install huggingface_hub")
    for model in config.models:
        if Path(model.path).exists():
            continue
        command = [executable, "download", model.path]
        if model.revision:
            command += ["--revision", model.revision]
        logger.info("downloading %s with %s", model.path, " ".join(command))
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0:
            raise CheckpointNotFoundError(
                f"'{' '.join(command)}' failed with exit code {completed.returncode}: check the model id and your network"
            )


def load_run_config(args: argparse.Namespace):
    from evomerge.config import load_config
    from evomerge.defaults import create_default_config

    config = load_config(args.config) if args.config else create_default_config()
    overrides = [args.model1, args.model2, args.model3]
    if any(overrides):
        config = apply_model_overrides(config, overrides)
    if args.seed is not None:
        config.evolution.seed = args.seed
    if args.output_dir:
        config.output_dir = args.output_dir
    if args.task_runner or args.address:
        from flows.runners import apply_runner_overrides

        config = apply_runner_overrides(config, args.task_runner, args.address)
    return config


def command_run(args: argparse.Namespace) -> int:
    from evomerge.summary import print_summary
    from flows.tournament import run_flow

    config = load_run_config(args)
    if args.use_cli:
        download_with_hf_cli(config)
    summary = run_flow(config, run_id=args.run_id)
    print_summary(summary)
    return EXIT_OK if summary.get("best_path") else EXIT_FAILED


def command_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.engine import merge_from_config

    output = merge_from_config(args.merge, args.output)
    print(output)
    return EXIT_OK


def command_evaluate(args: argparse.Namespace) -> int:
    from evomerge.config import EvaluationSettings, load_config
    from evomerge.evaluation import evaluate_model

    settings = load_config(args.config).evaluation if args.config else EvaluationSettings()
    if args.eval_text:
        missing = [path for path in args.eval_text if not Path(path).is_file()]
        if missing:
            raise UsageError(f"--eval-text file not found: {', '.join(missing)}")
        settings = settings.model_copy(update={"search_texts": list(args.eval_text)})
    if not settings.search_texts:
        from evomerge.testing import TINY_CORPUS

        logger.info("no --eval-text or configuration given: scoring on the built-in sample sentences")
        settings = settings.model_copy(update={"search_texts": list(TINY_CORPUS)})
    scores = evaluate_model(args.evaluate, settings)
    if args.json:
        payload: dict[str, Any] = {**scores.metrics, "fitness": scores.fitness, "failed": scores.failed}
        if scores.error:
            payload["error"] = scores.error
        payload.update({"model": args.evaluate, "device": scores.device, "tokens": scores.tokens, "wall_seconds": scores.wall_seconds})
        print(json.dumps(payload, sort_keys=True))
    else:
        print(f"model: {args.evaluate}")
        for name, value in sorted(scores.metrics.items()):
            print(f"  {name}: {value:.4f}")
        print(f"  fitness: {scores.fitness:.4f}")
        if scores.failed:
            print(f"  failed: {scores.error}")
    return EXIT_FAILED if scores.failed else EXIT_OK


def command_generate(args: argparse.Namespace) -> int:
    from evomerge.devices import select_device
    from evomerge.evaluation import generate_text, load_model_for_evaluation

    model, tokenizer = load_model_for_evaluation(args.generate, select_device("auto"))
    print(generate_text(model, tokenizer, args.prompt, max_length=args.max_length))
    return EXIT_OK


def command_report(args: argparse.Namespace) -> int:
    from evomerge.config import load_config
    from evomerge.defaults import DEFAULT_STATE_DIR
    from evomerge.redraw import redraw_run

    config = load_config(args.config) if args.config else None
    state_dir = config.storage.state_dir if config else DEFAULT_STATE_DIR
    files = redraw_run(args.report, state_dir=state_dir, ledger_path=config.storage.resolved_ledger_path() if config else None, output_dir=args.output_dir)
    for name, path in files.items():
        print(f"{name}: {path}")
    return EXIT_OK


def command_generate_config(args: argparse.Namespace, ask: Callable[[str], str] = input) -> int:
    from evomerge.config_wizard import run_wizard

    path = run_wizard(ask=ask, output=args.output)
    print(f"configuration written to {path}; run it with: python -m evomerge.cli --run --config {path}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": command_run,
    "merge": command_merge,
    "evaluate": command_evaluate,
    "generate": command_generate,
    "report": command_report,
    "generate_config": command_generate_config,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    from evomerge.logging_config import setup_logging

    setup_logging(verbose=args.verbose, log_file=args.log_file)
    try:
        action = chosen_action(args)
        for option in ("config", "merge"):
            value = getattr(args, option)
            if value and not Path(value).is_file():
                raise UsageError(f"--{option} file not found: {value}")
        if action == "merge" and Path(args.output).exists():
            raise UsageError(f"--output {args.output} already exists: choose a new folder or delete that one")
        return COMMANDS[action](args)
    except (UsageError, ConfigError, CheckpointNotFoundError) as error:
        print(f"evomerge: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except EvoMergeException as error:
        print(f"evomerge: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())

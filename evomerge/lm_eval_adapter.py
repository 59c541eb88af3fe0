"""Optional adapter that scores a loaded model on lm-evaluation-harness tasks.

``lm_eval`` is not a dependency of EvoMerge; install it with ``pip install "lm_eval[hf]"`` to use this
module. Most harness tasks download their data sets from the Hugging Face Hub, so they need network
access or a pre-filled ``HF_DATASETS_CACHE``.
"""

from __future__ import annotations

import importlib.util
import logging
import math

from evomerge.exceptions import ConfigError, EvaluationError

logger = logging.getLogger(__name__)


def lm_eval_available() -> bool:
    """Return whether the ``lm_eval`` package can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def flatten_results(results: dict) -> dict[str, float]:
    """Turn ``simple_evaluate``'s ``results`` section into ``{"lm_eval:<task>:<metric>": value}``.

    Harness metric keys look like ``"acc,none"`` (metric, filter); the filter is dropped when it is
    ``none``. Standard errors, aliases and non-numeric or non-finite entries are left out.
    """
    flat: dict[str, float] = {}
    for task, task_metrics in results.items():
        for key, value in task_metrics.items():
            if key == "alias" or "_stderr" in key:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
            flat[f"lm_eval:{task}:{name}"] = float(value)
    return flat


def evaluate_lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
) -> dict[str, float]:
    """Run lm-evaluation-harness ``tasks`` on an already loaded model and return flattened metrics.

    ``limit`` caps the examples per task (an int) or takes a fraction of them (a float below 1). Results
    of a limited run are not comparable with published numbers.
    """
    if not tasks:
        raise ConfigError("no lm-evaluation-harness tasks given: name at least one, e.g. ['arc_easy']")
    if not lm_eval_available():
        raise EvaluationError(
            "lm-evaluation-harness is not installed: run pip install 'lm_eval[hf]' or remove the lm_eval tasks"
        )

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    logger.info("running lm-evaluation-harness tasks %s (limit %s)", tasks, limit)
    try:
        output = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    except KeyError as error:
        raise ConfigError(
            f"lm-evaluation-harness does not know task {error}: list the valid names with 'lm-eval ls tasks'"
        ) from None
    if output is None:
        # NOTE: simple_evaluate returns None on non-zero ranks of a distributed run; EvoMerge runs one rank.
        raise EvaluationError("lm-evaluation-harness returned no results: run it in a single process")
    return flatten_results(output.get("results", {}))

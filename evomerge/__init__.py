"""EvoMerge: evolutionary merging of language-model fine-tunes.

The names below load lazily so that ``import evomerge`` stays cheap and does
not import torch or transformers until they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "MERGE_TECHNIQUES",
    "Configuration",
    "EvoMergeException",
    "create_default_config",
    "load_config",
    "run_evolutionary_tournament",
    "run_merge",
]

if TYPE_CHECKING:
    from evomerge.config import Configuration, load_config
    from evomerge.defaults import create_default_config
    from evomerge.exceptions import EvoMergeException
    from evomerge.merge.engine import run_merge
    from evomerge.merge.registry import MERGE_TECHNIQUES

_LAZY = {
    "MERGE_TECHNIQUES": ("evomerge.merge.registry", "MERGE_TECHNIQUES"),
    "Configuration": ("evomerge.config", "Configuration"),
    "EvoMergeException": ("evomerge.exceptions", "EvoMergeException"),
    "create_default_config": ("evomerge.defaults", "create_default_config"),
    "load_config": ("evomerge.config", "load_config"),
    "run_merge": ("evomerge.merge.engine", "run_merge"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")


def run_evolutionary_tournament(config: "Configuration | str | None" = None, *, run_id: str | None = None, use_prefect: bool = True):
    """Run a tournament and return the best model's path (``None`` if no candidate was built).

    With ``use_prefect`` (the default) it runs the ``evomerge`` Prefect flow
    in this process; otherwise the same loop runs in a plain thread pool.
    """
    from pathlib import Path

    if use_prefect:
        from flows.tournament import run_flow

        summary = run_flow(config, run_id=run_id)
        return Path(summary["best_path"]) if summary["best_path"] else None

    from evomerge.config import Configuration, load_config
    from evomerge.defaults import create_default_config
    from evomerge.tournament import run_tournament

    if config is None:
        config = create_default_config()
    elif not isinstance(config, Configuration):
        config = load_config(config)
    result = run_tournament(config, run_id=run_id)
    return result.best_path

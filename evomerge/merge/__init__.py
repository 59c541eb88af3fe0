"""Merge methods, the method registry and the merge engine.

The names below load lazily, so importing ``evomerge.merge.spec`` alone does
not import torch or the checkpoint module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "MERGE_TECHNIQUES",
    "MergeMethod",
    "MergeOptions",
    "MergeSpec",
    "get_method",
    "merge_from_config",
    "run_merge",
]

if TYPE_CHECKING:
    from evomerge.merge.engine import MergeOptions, merge_from_config, run_merge
    from evomerge.merge.registry import MERGE_TECHNIQUES, MergeMethod, get_method
    from evomerge.merge.spec import MergeSpec

_LAZY = {
    "MERGE_TECHNIQUES": "evomerge.merge.registry",
    "MergeMethod": "evomerge.merge.registry",
    "get_method": "evomerge.merge.registry",
    "MergeOptions": "evomerge.merge.engine",
    "merge_from_config": "evomerge.merge.engine",
    "run_merge": "evomerge.merge.engine",
    "MergeSpec": "evomerge.merge.spec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evomerge.merge' has no attribute {name!r}")

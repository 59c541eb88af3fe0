"""Prefect tasks: thin wrappers around ``evomerge.jobs`` that pass references, never tensors."""

from tasks.evaluate import evaluate_candidate_task
from tasks.merge import merge_candidate

__all__ = ["evaluate_candidate_task", "merge_candidate"]

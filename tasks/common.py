"""The retry rule shared by the merge and evaluation tasks."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from evomerge.exceptions import TransientStoreError


def retry_on_transient_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry only when the task failed on a transient store error (network, throttling, 5xx)."""
    try:
        state.result()
    except TransientStoreError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is permanent
        return False
    return False

"""The exception family raised for bad input and failed work.

Every message names the offending value and the fix, so a user can act on it
without reading the code.
"""


class EvoMergeException(Exception):
    """Base class for every error EvoMerge raises on purpose."""


class ConfigError(EvoMergeException):
    """A configuration, recipe or merge spec is invalid."""


class CheckpointError(EvoMergeException):
    """A model folder or checkpoint file cannot be read or written."""


class CheckpointNotFoundError(CheckpointError):
    """A model folder, Hub id or file does not exist or is not cached."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file is truncated, has a bad header, or is a Git LFS pointer."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint was found and the caller did not opt in to loading it."""


class IncompatibleModelsError(EvoMergeException):
    """The input models differ in architecture, tensor names, shapes or vocabulary."""


class MergeError(EvoMergeException):
    """A merge could not be computed (invalid parameters, non-finite values, overflow)."""


class EvaluationError(EvoMergeException):
    """A model could not be scored (empty text set, missing tokenizer, NaN logits)."""


class StoreError(EvoMergeException):
    """The checkpoint store failed to read, write or publish a checkpoint."""


class LedgerError(EvoMergeException):
    """The fitness ledger could not be opened, read or written."""


class GGUFError(EvoMergeException):
    """A GGUF file cannot be read, converted or written."""


class ReportError(EvoMergeException):
    """A chart, markdown summary or HTML report cannot be built from the given run data."""


class TransientStoreError(StoreError):
    """A store operation failed for a reason that may pass (network, timeout, server error); retrying may succeed."""

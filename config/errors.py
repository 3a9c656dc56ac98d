"""Errors the user fixes in the recipe or the data: reported as one message, no traceback."""


class UserError(ValueError):
    """The message names the field path or file:line at fault and is shown as it is."""


class WorkersFailed(RuntimeError):
    """A worker group ended with failures (their own messages were printed above)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf: the run stops before it saves or exports it."""

    exit_code = 3


class CheckpointWriteFailed(UserError):
    """A save failed for a reason of the machine (full disk, permissions): path and cause."""

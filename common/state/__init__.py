"""Training-state snapshots: round directories (`snapshots`) and optimizer/scheduler state (`optimizer`)."""


class CheckpointFormatError(ValueError):
    """A checkpoint cannot be read or does not belong to this run; the message says why."""

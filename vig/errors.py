"""The exception types that end a run with a one-line message instead of a traceback.

`UsageError` marks a mistake in the command line, config or data layout (exit status 2);
`RunError` marks a run that cannot go on for a reason outside the code, found while it runs: a
corrupt image, a non-finite loss, a full disk (exit status 1). Anything else is a bug and keeps
its traceback.
"""


class UsageError(ValueError):
    """A mistake in the user's command line, config or data: the CLI prints it as one line, no traceback."""


class RunError(RuntimeError):
    """A run stopped by its data, numerics or storage: the CLI prints it as one line, no traceback.

    `rank_local` is True when only the process that raised it knows about it (a corrupt image read by
    one rank), so that rank prints it even when it is not rank 0; errors that every rank raises
    together (a non-finite loss, decided collectively) are printed by rank 0 alone.
    """

    def __init__(self, message: str, rank_local: bool = False) -> None:
        super().__init__(message)
        self.rank_local = rank_local


class CorruptImageError(RunError):
    """An image file that cannot be decoded; the message names the file (rank-local: one rank reads it).

    A DataLoader worker's exception reaches the main process re-created from the worker's formatted
    traceback, whose last line is ``vig.errors.CorruptImageError: <message>``; that message is kept.
    """

    def __init__(self, message: str) -> None:
        last_line = message.strip().splitlines()[-1] if message.strip() else message
        prefix = f"{CorruptImageError.__module__}.{CorruptImageError.__qualname__}: "
        super().__init__(last_line[len(prefix):] if last_line.startswith(prefix) else message, rank_local=True)


class WeightsUnavailableError(RunError):
    """Published weights a model needs cannot be fetched (no network, not in the cache). `argument` names the
    model's keyword argument that takes a local weights file instead, so that a front end (train.py, a tool)
    can say how to pass it with its own flags; the message itself speaks of that argument alone."""

    def __init__(self, message: str, argument: str) -> None:
        super().__init__(message)
        self.argument = argument

"""The one exception type that marks a user mistake (bad flag, missing data, unknown model)."""


class UsageError(ValueError):
    """A mistake in the user's command line, config or data: the CLI prints it as one line, no traceback."""

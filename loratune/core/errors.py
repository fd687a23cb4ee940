"""The one exception type that reaches the user as a single clear line."""


class UserError(Exception):
    """Bad input or environment: the CLI prints the message alone (no traceback) and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2, label: str = "error"):
        super().__init__(message)
        self.exit_code = exit_code
        self.label = label  # how the CLI introduces the message


class BadRowError(UserError):
    """A malformed data row. The CLI adds how to skip such rows where the command has a flag for it (train does,
    eval and generate do not)."""


def first_line(error: Exception, limit: int | None = 200) -> str:
    """The first line of a library's error message (its type when the message is empty), for one-line reports."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]

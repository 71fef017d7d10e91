"""The one exception family for errors a user can cause."""


class DiffuMaskError(ValueError):
    """A bad value given by the user. The message names the value and the fix.

    The CLI prints the message alone (no traceback) and exits non-zero.
    """


def one_line(text: object) -> str:
    """`text` with its whitespace runs (newlines included) folded into single spaces."""
    return " ".join(str(text).split())

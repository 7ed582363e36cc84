"""User-facing errors.

Every mistake a user can make (unknown model, malformed recipe, missing data, impossible
parameters) raises :class:`LeanfmError` with one line that names what is wrong and how to fix
it. The CLI prints that line and exits with code 2; it never shows a traceback for these.
"""


class LeanfmError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

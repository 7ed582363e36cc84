"""User-facing errors.

Every mistake a user can make (unknown model, malformed recipe, missing data, impossible
parameters) raises :class:`LeanfmError` with one line that names what is wrong and how to fix
it. The CLI prints that line and exits with code 2; it never shows a traceback for these.
"""


class LeanfmError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def os_reason(e: OSError) -> str:
    """A short reason for a file-system error, for one-line messages ("permission denied", ...)."""
    import errno

    return {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
            errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.ENOTDIR: "a part of the path is a file, not a folder", errno.ENAMETOOLONG: "the name is too long"}.get(
        e.errno, e.strerror or type(e).__name__)

"""User-facing errors.

Every problem a user can fix (a missing dataset, a config typo, a corrupt checkpoint, a
missing optional package) is raised as :class:`SmopeError` with a message that names the
problem and the fix. The CLI prints the message alone and exits non-zero; library users
catch it like any other exception.
"""


class SmopeError(Exception):
    """A problem the user can fix; the message says how."""


class MissingExtraError(SmopeError, ImportError):
    """An optional package is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the package '{package}', which is not installed. "
            f"Install it with: pip install 'smope[{extra}]'  (or: pip install {package})"
        )

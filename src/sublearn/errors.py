"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class SublearnError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class MissingExtraError(SublearnError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this feature needs the '{module}' package: pip install \"sublearn[{extra}]\""
        )


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error can quote of a library's many-line message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

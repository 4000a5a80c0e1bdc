"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class SublearnError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class MissingExtraError(SublearnError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this feature needs the '{module}' package: pip install \"sublearn[{extra}]\""
        )

"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class LLMCoreError(Exception):
    """A problem the user can fix (bad input, bad flag, missing file); the message says what and where."""


class DataError(LLMCoreError):
    """Bad input data; the message names the file and line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, reason: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line
        self.reason = reason


def install_hint(extra: str) -> str:
    """How to get an optional dependency group. From a checkout: `pip install -e '.[extra]'`; the
    published distribution is `llmcore-train` (PyPI's `llmcore` is an unrelated project)."""
    return f"pip install -e '.[{extra}]' in the llmcore checkout (or pip install 'llmcore-train[{extra}]')"

"""The one exception the command line turns into ``error: <message>`` and exit status 2."""


class UsageError(ValueError):
    """A bad flag, path, file format, device or dtype: the user's input, not a bug. The command
    line prints ``error: <message>`` (one line, no traceback) and exits with status 2, as argparse
    does; from Python it is a ``ValueError``."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the source said

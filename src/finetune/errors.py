"""The one exception type the CLI turns into a single line on stderr."""


class FinetuneError(Exception):
    """A user-facing error: the message names the file/key/row and what would fix it."""

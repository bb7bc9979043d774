"""The one exception type a user sees as a single line."""


class HpcLlamaError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class GraphpruneError(Exception):
    """An error caused by the user's input (file, option, data), reported as one line."""

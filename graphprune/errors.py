"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class GraphpruneError(Exception):
    """An error caused by the user's input (file, option, data), reported as one line."""


def a_few(names: list[str] | tuple[str, ...], shown: int = 3) -> str:
    """The first ``shown`` names and how many more there are: error messages stay one short line."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")

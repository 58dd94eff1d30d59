"""graphprune's command line: each module below registers its commands on :data:`app`."""

from graphprune.cli import (
    calibrate,  # noqa: F401  (registers calibrate)
    deploy,  # noqa: F401  (registers convert, build, bench)
    evaluate,  # noqa: F401  (registers eval)
    prune,  # noqa: F401  (registers apply, check)
    quantize,  # noqa: F401  (registers quantize)
    shrink,  # noqa: F401  (registers shrink)
)
from graphprune.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]

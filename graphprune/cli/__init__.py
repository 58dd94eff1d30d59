"""graphprune's command line: :data:`app` lists every command of ``app.COMMANDS`` and imports a command's
module (which registers it on :data:`app`) only when that command runs, so ``graphprune --help`` starts fast."""

from graphprune.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]

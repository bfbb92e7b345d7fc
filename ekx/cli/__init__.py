"""The `ekx` command line: thin. Options -> config -> one library call.

One module per stage or group (data, stage1, stage2, video, cluster); every heavy
import (torch, the trainer, the decoder) happens inside a command's body, so
`ekx --help` and `ekx CMD --help` answer without loading torch. Errors reach the user as
one red line and exit code 1 (`--debug` shows the traceback).
"""

from __future__ import annotations

# importing registers the commands, in the order --help lists them (compare after sweep)
from ekx.cli import cluster, data, models, stage1, stage2, results, video  # noqa: F401  # isort: skip
from ekx.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()

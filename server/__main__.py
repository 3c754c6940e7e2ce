"""`python -m server` = the `loramux` CLI, with `serve` as the default subcommand."""
from __future__ import annotations

import sys

from server.cli import main

if __name__ == "__main__":
    sys.exit(main(default_command="serve"))

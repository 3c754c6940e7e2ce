"""`python -m loadtest`: the same entry point as the `loramux-loadtest` script."""
from loadtest.cli import main

raise SystemExit(main())

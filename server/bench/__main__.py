"""`python -m server.bench`: the engine benchmark (server/bench/engine.py)."""
import sys

from server.bench.engine import main

sys.exit(main())

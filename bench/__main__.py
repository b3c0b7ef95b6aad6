"""`python -m bench`: see bench/run.py and bench/README.md; `python -m bench memory`: bench/memory."""
import sys

if sys.argv[1:2] == ["memory"]:
    from .memory.cli import main as memory_main

    raise SystemExit(memory_main(sys.argv[2:]))

from .run import main

raise SystemExit(main())

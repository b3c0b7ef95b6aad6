"""`python -m bench.memory` (the same as `python -m bench memory`)."""
from .cli import main

raise SystemExit(main())

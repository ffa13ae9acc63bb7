"""``python -m fastddim.benchmark``: the same as ``fastddim bench``."""

from fastddim.benchmark.command import main

raise SystemExit(main())

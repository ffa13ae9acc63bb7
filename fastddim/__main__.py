"""``python -m fastddim``: the ``fastddim`` command line (see `fastddim.cli`)."""

from fastddim.cli import main

raise SystemExit(main())

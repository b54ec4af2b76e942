"""``python -m infercache`` is the ``infercache`` command."""

from infercache.cli import main

raise SystemExit(main())

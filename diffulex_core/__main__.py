"""``python -m diffulex_core`` runs the ``diffulex`` command line."""

from diffulex_core.tools.cli import main

raise SystemExit(main())

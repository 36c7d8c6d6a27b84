"""``python -m diffulex_core`` runs the ``diffulex`` command line."""

from .cli import main

raise SystemExit(main())

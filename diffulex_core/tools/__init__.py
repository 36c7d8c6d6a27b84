"""The ``diffulex`` command line (``cli``), ``diffulex check`` (``check``) and ``diffulex demo`` (``demo``).
They use the library's public and package-internal APIs only."""

__all__: list[str] = []  # a layer of modules; import each by its own name

"""One load from plan to report: packed-module mappings, the planner (every tensor's destination from
the headers alone), the apply step (watched code first, then the byte moves), write watching and
undo, ties, interrupts, the partial-load mark and ``LoadReport``. The public doors are
``diffulex_core.loader``."""

__all__: list[str] = []  # a layer of modules; import each by its own name

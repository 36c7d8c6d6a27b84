"""The byte movers: ``preadv`` straight into destinations with bounded casts (``reader``),
checkpoint tensors narrowed before they are read (``slices``), the CUDA staging paths
(``staging``) and the memory helpers they share (``memory``). They take file descriptors and
destination tensors, never a model."""

__all__: list[str] = []  # a layer of modules; import each by its own name

"""The byte movers: ``preadv`` straight into destinations with bounded casts (``reader``),
checkpoint tensors narrowed before they are read (``slices``) and the CUDA staging paths
(``staging``). They take file descriptors and destination tensors, never a model."""

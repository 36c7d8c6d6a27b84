"""The file layer: opening regular files only (``regular``), finding a checkpoint's safetensors
files (``finding``), reading and validating their headers as strictly as safetensors does
(``headers``), holding them open for one load (``handles``) and writing checkpoints (``writer``).
Nothing here knows about models."""

__all__: list[str] = []  # a layer of modules; import each by its own name

"""The file layer: finding a checkpoint's safetensors files, reading and validating their headers
as strictly as safetensors does (``headers``), holding them open for one load (``handles``) and
writing checkpoints (``writer``). Nothing here knows about models."""

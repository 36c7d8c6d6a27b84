"""Typed errors and warnings, so callers can catch exactly what went wrong."""

__all__ = [
    "DiffulexError",
    "ConfigurationError",
    "PluginError",
    "PluginLoadError",
    "PluginHookError",
    "FamilyError",
    "UnknownFamilyError",
    "DuplicateFamilyError",
    "FamilyFactoryError",
    "PluginWarning",
    "LoadError",
    "CheckpointNotFoundError",
    "CheckpointFormatError",
    "LoadPlanError",
    "LoadApplyError",
    "PartialLoadError",
    "WeightSpecError",
    "LoraError",
    "LoraConfigError",
    "LoraAdapterError",
    "LoraWarning",
    "LoadWarning",
    "TokenizerLoadError",
    "ParallelConfigError",
    "ParallelLoadError",
]


class DiffulexError(Exception):
    """Base class of every error raised by diffulex-core."""


class ConfigurationError(DiffulexError, ValueError):
    """An environment variable or option has a value we cannot interpret."""


class PluginError(DiffulexError):
    """A plugin could not be loaded (raised in strict mode, or listed in reports)."""


class PluginLoadError(PluginError):
    """Strict mode (``DIFFULEX_STRICT_PLUGINS=1``) found one or more plugin failures."""

    def __init__(self, failures):
        self.failures = tuple(failures)
        lines = [f"{len(self.failures)} plugin problem(s) with DIFFULEX_STRICT_PLUGINS=1:"]
        lines += [f"  - {failure.describe()}" for failure in self.failures]
        super().__init__("\n".join(lines))


class PluginHookError(PluginError):
    """A plugin's hook implementation raised: ``plugin`` (a ``PluginInfo``) and ``hook`` say whose
    and which; the original exception is the ``__cause__``."""

    def __init__(self, plugin, hook: str, error: BaseException) -> None:
        super().__init__(f"{plugin.label}: {hook} raised {type(error).__name__}: {error}")
        self.plugin, self.hook = plugin, hook


class FamilyError(DiffulexError, LookupError):
    """A model-family lookup failed."""


class UnknownFamilyError(FamilyError):
    """No plugin registered the requested family name."""


class DuplicateFamilyError(FamilyError):
    """Two plugins registered the same family name and neither asked to override."""


class FamilyFactoryError(FamilyError):
    """A family's lazy ``"module:attr"`` factory could not be imported or is not callable."""


class PluginWarning(UserWarning):
    """A plugin failed and was skipped; the other plugins still work."""


class LoadError(DiffulexError):
    """Base class of every checkpoint-loading error. Unless it says otherwise, nothing was written."""


class CheckpointNotFoundError(LoadError, FileNotFoundError):
    """The checkpoint path does not exist, or holds no ``.safetensors`` file."""


class CheckpointFormatError(LoadError):
    """A checkpoint file or index is malformed (truncated, bad header, LFS pointer, pickle, ...)."""


class LoadPlanError(LoadError):
    """The load plan found problems (unexpected or missing tensors, shape or dtype mismatches).

    ``report`` holds the full ``LoadReport``; nothing was written to the model.
    """

    def __init__(self, message: str, report) -> None:
        super().__init__(message)
        self.report = report


class LoadApplyError(LoadError):
    """Writing tensors failed part-way (model code raised, or a read failed). The model is left
    as it was where undo was possible; otherwise it is marked as partly written (its forward
    raises ``PartialLoadError``). ``report`` is the load's ``LoadReport`` where one was made."""

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report


class PartialLoadError(LoadError):
    """The model was left partly written by a failed load (``partial``, a ``PartialLoad``, says
    which and why); its forward refuses to run until a load into it writes every parameter."""

    def __init__(self, message: str, partial) -> None:
        super().__init__(message)
        self.partial = partial


class WeightSpecError(LoadError, ValueError):
    """A ``ResolvedWeight`` or packed-module mapping is malformed."""


class LoraError(LoadError):
    """A LoRA adapter could not be loaded. Unless it says otherwise, no weight was changed and no
    adapter was added to the model."""


class LoraConfigError(LoraError, ValueError):
    """``adapter_config.json`` is missing a directory, is not valid JSON, or asks for a feature
    (DoRA, trained biases, ``modules_to_save``, ...) that diffulex-core does not implement."""


class LoraAdapterError(LoraError):
    """The adapter's tensors and the model or config disagree: tensors that match no module,
    targeted modules without tensors, ranks or shapes that do not fit. ``problems`` lists each,
    naming the adapter file, tensor and module."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class LoraWarning(UserWarning):
    """A LoRA load went on with a default the seed would use (no ``adapter_config.json``, an
    empty ``lora_path``); the message says which."""


class LoadWarning(UserWarning):
    """A seed-style load (``load_model``) went on past tensors nothing takes or parameters
    nothing writes, as Diffulex's loader does; the message lists them."""


class TokenizerLoadError(DiffulexError):
    """A tokenizer could not be built, for a reason we can name (missing directory, a tokenizer
    JSON file that is not a JSON object, a built tokenizer that cannot encode text, a fixup that
    asked for something it may not). Other errors from transformers propagate unchanged."""


class ParallelConfigError(DiffulexError, ValueError):
    """The tensor- or expert-parallel setup does not fit the model (a group size that does not
    divide the heads, a process outside its group, a group given without torch.distributed)."""


class ParallelLoadError(LoadError):
    """A load failed on one or more ranks of a parallel group; every rank raises it, naming the
    ranks and their errors, so no rank goes on alone (or waits forever for the others).

    ``failures`` maps each failed rank (global rank) to its error, as ``"Type: message"``.
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = dict(failures)

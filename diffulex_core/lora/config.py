"""LoRA adapter configuration: ``adapter_config.json`` read, validated, and matched as PEFT matches it.

PEFT owns the format. We read the fields that decide what an adapter computes, refuse those
whose feature we do not implement (naming the field), and match module names exactly as PEFT's
``check_target_module_exists`` and ``get_pattern_key`` do, so an adapter targets here what it
targeted when it was trained. Names are the adapter's (checkpoint) module names, such as
``model.layers.0.self_attn.q_proj``; ``diffulex_core.lora.adapters`` translates them to the model's.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffulex_core.errors import LoraConfigError, LoraWarning

__all__ = ["LoraConfig", "load_lora_config", "ALL_LINEAR", "SEED_DEFAULTS"]

ALL_LINEAR = "all-linear"
SEED_DEFAULTS = {"r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0}  # Diffulex's defaults, without a config file

# Fields that change what the adapter computes, with the only value we implement.
_UNSUPPORTED_UNLESS = {
    "use_dora": False, "lora_bias": False, "use_qalora": False, "alora_invocation_tokens": None,
    "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "monteclora_config": None,
    "velora_config": None, "megatron_config": None,
}  # fmt: skip
# Fields that only matter when training or initialising, or describe provenance.
_IGNORED = {
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "inference_mode",
    "base_model_name_or_path", "revision", "task_type", "auto_mapping", "peft_version", "megatron_core",
    "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
         "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save", "bias", "layers_to_transform",
         "layers_pattern"}


def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _names(value: Any, field_name: str, source: str) -> str | tuple[str, ...] | None:
    """PEFT's ``target_modules``/``exclude_modules``: None, one regex string, or a list of names."""
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            _compiles(value, field_name, source)
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise LoraConfigError(f"{source}: {field_name} must be a regex string or a list of module names, got {value!r}")


def _compiles(pattern: str, what: str, source: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise LoraConfigError(f"{source}: {what} {pattern!r} is not a valid regular expression: {exc}") from None


def _number(value: Any, field_name: str, source: str, *, integer: bool = False, positive: bool = True) -> Any:
    ok_type = int if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, ok_type)
            or (isinstance(value, float) and not math.isfinite(value))):
        kind = "an integer" if integer else "a number"
        raise LoraConfigError(f"{source}: {field_name} must be {kind}, got {value!r}")
    if positive and value <= 0:
        raise LoraConfigError(f"{source}: {field_name} must be positive, got {value!r}")
    return value


def _pattern(value: Any, field_name: str, source: str, integer: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LoraConfigError(f"{source}: {field_name} must map module names to values, got {value!r}")
    out = {}
    for key, number in value.items():
        if not isinstance(key, str) or not key:
            raise LoraConfigError(f"{source}: {field_name} has a key {key!r} that is not a module name")
        _compiles(key, f"{field_name} key", source)
        out[key] = _number(number, f"{field_name}[{key!r}]", source, integer=integer)
    return out


def _refuse_unsupported(data: dict[str, Any], source: str) -> None:
    """A ``LoraConfigError`` for any field whose value would make us compute something else than PEFT."""
    peft_type = data.get("peft_type", "LORA")
    if peft_type not in ("LORA", None):
        raise LoraConfigError(f"{source}: peft_type is {peft_type!r}; diffulex-core loads LoRA adapters only")
    for name, supported in _UNSUPPORTED_UNLESS.items():
        if name in data and data[name] != supported and not _empty(data[name]):
            raise LoraConfigError(f"{source}: {name}={data[name]!r} is not supported (only {supported!r}); "
                                  f"diffulex-core would compute something else than the adapter was trained for")
    if data.get("bias", "none") != "none":
        raise LoraConfigError(f"{source}: bias={data['bias']!r} is not supported (only 'none'): the adapter "
                              f"would carry trained biases diffulex-core does not apply")
    if not _empty(data.get("modules_to_save")):
        raise LoraConfigError(f"{source}: modules_to_save={data['modules_to_save']!r} is not supported: those "
                              f"modules are replaced whole by the adapter; merge them into the base checkpoint")
    known = _READ | _IGNORED | set(_UNSUPPORTED_UNLESS)
    unknown = sorted(k for k, v in data.items() if k not in known and not _empty(v))
    if unknown:
        raise LoraConfigError(f"{source}: unknown field(s) {unknown} set; this version cannot tell whether they "
                              f"change what the adapter computes")


@dataclass(frozen=True)
class LoraConfig(Mapping):
    """A validated ``adapter_config.json``.

    Attributes give the typed fields; it is also the read-only mapping of the file's fields
    (seed defaults filled in), so code written for Diffulex's ``load_lora_config``, which
    returned the raw dict, keeps working (``config["r"]``, ``config.get("target_modules")``).
    """

    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    source: str = "LoRA config"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "LoRA config") -> LoraConfig:
        """Validate a config mapping; a field we cannot honour is a ``LoraConfigError`` naming it."""
        if isinstance(data, LoraConfig):
            return data
        if not isinstance(data, Mapping):
            raise LoraConfigError(f"{source} must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        _refuse_unsupported(data, source)
        r = _number(data.get("r", SEED_DEFAULTS["r"]), "r", source, integer=True)
        alpha = _number(data.get("lora_alpha", SEED_DEFAULTS["lora_alpha"]), "lora_alpha", source)
        dropout = _number(data.get("lora_dropout", 0.0), "lora_dropout", source, positive=False)
        if not 0 <= dropout < 1:
            raise LoraConfigError(f"{source}: lora_dropout must be in [0, 1), got {dropout!r}")
        flags = {}
        for name in ("use_rslora", "fan_in_fan_out"):
            flags[name] = data.get(name, False)
            if not isinstance(flags[name], bool):
                raise LoraConfigError(f"{source}: {name} must be true or false, got {flags[name]!r}")
        layers = data.get("layers_to_transform")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is not None and not (
                isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise LoraConfigError(f"{source}: layers_to_transform must be an integer or a list of integers, got "
                                  f"{layers!r}")
        layers_pattern = data.get("layers_pattern")
        if isinstance(layers_pattern, str):
            layers_pattern = [layers_pattern]
        if layers_pattern is not None and not (
                isinstance(layers_pattern, list) and all(isinstance(p, str) for p in layers_pattern)):
            raise LoraConfigError(f"{source}: layers_pattern must be a string or a list of strings, got "
                                  f"{layers_pattern!r}")
        target = _names(data.get("target_modules"), "target_modules", source)
        raw = {**SEED_DEFAULTS, **data}
        return cls(
            r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=target,
            exclude_modules=_names(data.get("exclude_modules"), "exclude_modules", source),
            use_rslora=flags["use_rslora"],
            rank_pattern=_pattern(data.get("rank_pattern"), "rank_pattern", source, True),
            alpha_pattern=_pattern(data.get("alpha_pattern"), "alpha_pattern", source, False),
            fan_in_fan_out=flags["fan_in_fan_out"], layers_to_transform=tuple(layers) if layers else None,
            layers_pattern=tuple(layers_pattern) if layers_pattern else None, source=source, raw=raw,
        )  # fmt: skip

    # ---------------------------------------------------------------- the seed's dict view

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    # ---------------------------------------------------------------- matching, as PEFT does

    @property
    def targets_text(self) -> str:
        """``target_modules`` as the file wrote it, for messages."""
        t = self.target_modules
        return repr(list(t) if isinstance(t, tuple) else t)

    @property
    def all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def excluded(self, name: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, name) is not None
        return name in ex or any(name.endswith(f".{key}") for key in ex)

    def targets(self, name: str, aliases: tuple[str, ...] = ()) -> bool:
        """Whether ``target_modules`` selects module ``name`` (``aliases``: the seed's
        ``lora_target_aliases``, extra leaf names a module answers to). ``all-linear`` is the
        caller's to decide (it depends on the module's kind)."""
        if self.excluded(name):
            return False
        target = self.target_modules
        if target is None:
            return True  # the seed: every module that supports LoRA
        if isinstance(target, str):
            return self.all_linear or re.fullmatch(target, name) is not None
        found = name in target or any(name.endswith(f".{key}") for key in target) or any(a in target for a in aliases)
        return found and self._in_layers(name)

    def _in_layers(self, name: str) -> bool:
        """PEFT's ``layers_to_transform``: the first numbered segment (after ``layers_pattern``) is the layer."""
        if not self.layers_to_transform:
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if match:
                    break
        return match is not None and int(match.group("idx")) in self.layers_to_transform

    @staticmethod
    def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
        for key in pattern:  # PEFT's get_pattern_key: the first key that ends the name at a dot boundary
            if re.match(rf"(.*\.)?({key})$", name):
                return pattern[key]
        return default

    def rank_for(self, name: str) -> int:
        return self._pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return self._pattern_value(self.alpha_pattern, name, self.lora_alpha)

    def scaling_for(self, name: str) -> float:
        """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r, alpha = self.rank_for(name), self.alpha_for(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def load_lora_config(lora_path: str | Path) -> LoraConfig:
    """Read and validate ``lora_path/adapter_config.json``.

    Without the file, the seed's defaults (r=16, lora_alpha=32, no target list) with a
    ``LoraWarning``. A directory that does not exist, unreadable or invalid JSON, or a field we
    cannot honour raise ``LoraConfigError`` naming the file and field.
    """
    path = Path(lora_path)
    if not path.is_dir():
        raise LoraConfigError(f"LoRA adapter directory {path} does not exist" if not path.exists()
                              else f"LoRA adapter path {path} is not a directory")
    config_path = path / "adapter_config.json"
    if not config_path.exists():
        warnings.warn(f"{config_path} not found: using the seed's LoRA defaults r={SEED_DEFAULTS['r']}, "
                      f"lora_alpha={SEED_DEFAULTS['lora_alpha']:g}, targets from the adapter's tensors", LoraWarning,
                      stacklevel=2)
        return LoraConfig.from_dict({}, source=str(config_path))
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraConfigError(f"{config_path} cannot be read as JSON: {exc}") from None
    return LoraConfig.from_dict(data, source=str(config_path))

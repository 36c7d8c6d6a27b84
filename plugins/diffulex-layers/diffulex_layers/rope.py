"""Rotary-embedding frequencies for the rope scaling variants Qwen3 / Qwen3-MoE configs can ask for.

A checkpoint's ``config.json`` says how its rotary embedding was trained (base ``theta`` and an
optional scaling recipe); the engine must rebuild the very same ``inv_freq`` and cos/sin scale or
the model silently degrades at long context. ``rope_parameters`` reads that description from either
config dialect and checks it; ``inv_freq_and_scale`` turns it into numbers. The formulas follow
``transformers.modeling_rope_utils`` (5.x) step for step, in the same float32 operation order, so
the results are bit-identical to transformers' for the same inputs (the tests check this).

Supported ``rope_type`` values: ``default``, ``linear``, ``dynamic``, ``yarn``, ``llama3``.
Not supported (refused with ``ValueError``): ``longrope``, ``proportional`` and other types,
``partial_rotary_factor`` other than 1, multimodal ``mrope_section`` and per-layer-type
(nested) ``rope_parameters``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["SUPPORTED_ROPE_TYPES", "RopeParameters", "inv_freq_and_scale", "rope_parameters"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# Dataclass field -> config key, so that errors name what the user has to fix in config.json.
_CONFIG_KEYS = {"theta": "rope_theta", "original_max_positions": "original_max_position_embeddings"}


@dataclass(frozen=True)
class RopeParameters:
    """How a checkpoint's rotary embedding is parameterised (validated on construction).

    ``factor`` is required by every type but ``default``. ``original_max_positions`` is the
    pre-training context length yarn and llama3 scale from; ``None`` there means "the model's
    ``max_positions``", as transformers defaults it. ``dynamic`` always scales relative to
    ``max_positions`` (transformers uses ``max_position_embeddings`` there, not the original length).
    yarn: ``beta_fast``/``beta_slow`` bound the ramp between extrapolated and interpolated
    frequencies (``None`` -> 32 / 1); ``attention_factor`` is the cos/sin scale, inferred from
    ``factor`` (and ``mscale``/``mscale_all_dim`` when both are set) when ``None``; ``truncate``
    rounds the ramp bounds to whole dimensions. llama3: ``low_freq_factor``/``high_freq_factor``
    pick the wavelength band that is smoothly interpolated.
    """

    rope_type: str
    theta: float
    factor: float | None = None
    original_max_positions: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def __post_init__(self) -> None:
        _check(asdict(self), lambda name: name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(v: Mapping[str, Any], label: Callable[[str], str]) -> None:
    """Refuse values that would give wrong or non-finite frequencies; ``label`` names a field for the error."""

    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"{label(name)} = {v[name]!r} {why}")

    rope_type = v["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise bad("rope_type", f"is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if not _is_number(v["theta"]) or v["theta"] <= 0:
        raise bad("theta", "must be a number > 0")
    if rope_type == "default":
        return
    if v["factor"] is None:
        raise bad("factor", f"is missing; rope_type {rope_type!r} needs it")
    if not _is_number(v["factor"]) or v["factor"] <= 0:
        raise bad("factor", "must be a number > 0")
    if rope_type in ("yarn", "llama3") and v["original_max_positions"] is not None:
        omp = v["original_max_positions"]
        if not isinstance(omp, int) or isinstance(omp, bool) or omp <= 0:
            raise bad("original_max_positions", "must be an integer > 0")
    if rope_type == "yarn":
        _check_yarn(v, bad)
    if rope_type == "llama3":
        _check_llama3(v, bad)


def _check_yarn(v: Mapping[str, Any], bad: Callable[[str, str], ValueError]) -> None:
    for name in ("beta_fast", "beta_slow", "attention_factor"):
        if v[name] is not None and (not _is_number(v[name]) or v[name] <= 0):
            raise bad(name, "must be a number > 0")
    for name in ("mscale", "mscale_all_dim"):
        if v[name] is not None and not _is_number(v[name]):
            raise bad(name, "must be a number")
    if not isinstance(v["truncate"], bool):
        raise bad("truncate", "must be true or false")


def _check_llama3(v: Mapping[str, Any], bad: Callable[[str, str], ValueError]) -> None:
    for name in ("low_freq_factor", "high_freq_factor"):
        if v[name] is None:
            raise bad(name, "is missing; rope_type 'llama3' needs it")
        if not _is_number(v[name]) or v[name] <= 0:
            raise bad(name, "must be a number > 0")
    if v["high_freq_factor"] <= v["low_freq_factor"]:
        raise bad("high_freq_factor", f"must be greater than low_freq_factor ({v['low_freq_factor']!r})")


def rope_parameters(config: Mapping[str, Any], default_theta: float = 10000.0) -> RopeParameters:
    """Read the rotary embedding description from a ``config.json`` mapping.

    transformers 5 writes ``rope_parameters`` (``rope_type``, ``rope_theta`` and the scaling
    fields in one dict); transformers 4 writes a top-level ``rope_theta`` next to ``rope_scaling``
    (a dict keyed by ``rope_type`` or the legacy ``type``, or null). Both are accepted, with
    transformers' precedence: a non-empty ``rope_scaling`` wins over ``rope_parameters``;
    ``rope_theta`` inside the dict wins over the top-level one, which wins over ``default_theta``;
    ``rope_type`` wins over ``type``; a missing type means ``default``. yarn and llama3 take their
    original length from the dict, else from a top-level ``original_max_position_embeddings``
    (transformers gives that one priority, for Phi-3-style configs), else from
    ``max_position_embeddings``. Errors name the config field to fix.
    """
    if config.get("rope_scaling"):
        where, rope = "rope_scaling", config["rope_scaling"]
    else:
        where, rope = "rope_parameters", config.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"{where} = {rope!r} must be a mapping or null")
    if any(isinstance(value, Mapping) for value in rope.values()):
        raise ValueError(f"{where} = {dict(rope)!r}: per-layer-type rope parameters are not supported")

    labels = {"theta": f"{where}.rope_theta" if "rope_theta" in rope else "rope_theta"}
    type_key = "rope_type" if "rope_type" in rope or "type" not in rope else "type"
    values: dict[str, Any] = {
        "rope_type": rope.get(type_key, "default"),
        "theta": rope.get("rope_theta", config.get("rope_theta", default_theta)),
    }
    labels["rope_type"] = f"{where}.{type_key}"

    for key, location in ((where, rope), ("", config)):
        prf = location.get("partial_rotary_factor")
        if prf is not None and prf != 1.0:
            raise ValueError(f"{key + '.' if key else ''}partial_rotary_factor = {prf!r} is not supported (only 1.0)")
    if rope.get("mrope_section") is not None:
        raise ValueError(f"{where}.mrope_section = {rope['mrope_section']!r} is not supported")

    if values["rope_type"] != "default":
        for name in ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                     "low_freq_factor", "high_freq_factor"):
            values[name] = rope.get(name)
        truncate = rope.get("truncate", True)
        values["truncate"] = False if truncate is None else truncate  # transformers: an explicit null is falsy
    if values["rope_type"] in ("yarn", "llama3"):
        for key, location, label in (
            ("original_max_position_embeddings", config, "original_max_position_embeddings"),
            ("original_max_position_embeddings", rope, f"{where}.original_max_position_embeddings"),
            ("max_position_embeddings", config, "max_position_embeddings"),
        ):
            if location.get(key) is not None:  # none of them: None, i.e. `max_positions` later
                values["original_max_positions"], labels["original_max_positions"] = location[key], label
                break

    _check({**asdict(RopeParameters("default", 1.0)), **values},
           lambda name: labels.get(name, f"{where}.{_CONFIG_KEYS.get(name, name)}"))
    return RopeParameters(**values)


def _plain_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """theta^(-2i/dim) in float32, written exactly as transformers does so the bits agree."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq_and_scale(
    params: RopeParameters, head_dim: int, max_positions: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq, attention_scaling)`` as transformers computes them.

    ``inv_freq`` is float32 ``[head_dim // 2]`` (angle of position p is ``p * inv_freq``);
    ``attention_scaling`` multiplies cos and sin (1.0 except for yarn). ``max_positions`` is the
    config's ``max_position_embeddings``. ``seq_len`` only matters for ``dynamic``: for a sequence
    longer than ``max_positions`` the base grows (NTK-aware scaling) as transformers'
    ``dynamic_rope_update`` recomputes it; shorter sequences get the unscaled frequencies.
    Unlike that stateful update (which keeps the longest length seen until a short sequence
    resets it), the answer here depends on ``seq_len`` alone.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim = {head_dim!r} must be a positive even integer")
    kind, theta, factor = params.rope_type, float(params.theta), params.factor
    original = params.original_max_positions or max_positions

    if kind == "default":
        return _plain_inv_freq(theta, head_dim), 1.0
    if kind == "linear":  # positions / factor == frequencies / factor
        return _plain_inv_freq(theta, head_dim) / factor, 1.0
    if kind == "dynamic":
        if seq_len is None or seq_len <= max_positions:
            return _plain_inv_freq(theta, head_dim), 1.0  # the NTK formula is the identity here
        # transformers' runtime update gets the length as an int64 tensor, so the new base is
        # computed in float32; doing the same keeps the frequencies bit-identical to the model's.
        length = torch.tensor(seq_len, dtype=torch.int64)
        base = theta * ((factor * length / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _plain_inv_freq(base, head_dim), 1.0
    if kind == "llama3":
        return _llama3(_plain_inv_freq(theta, head_dim), params, original), 1.0
    if kind == "yarn":
        return _yarn(params, head_dim, original)
    raise ValueError(f"rope_type = {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def _llama3(inv_freq: torch.Tensor, params: RopeParameters, original: int) -> torch.Tensor:
    """Llama 3.1: keep short wavelengths, divide long ones by ``factor``, blend the band between."""
    factor, low, high = params.factor, params.low_freq_factor, params.high_freq_factor
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(params: RopeParameters, dim: int, original: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): dimensions that turn fewer than ``beta_slow`` times over the
    original context are interpolated (divided by ``factor``), those turning more than
    ``beta_fast`` times are kept, a linear ramp blends the rest; cos/sin are scaled up to keep
    attention entropy (``attention_factor``)."""
    theta, factor = float(params.theta), params.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.attention_factor
    if attention_factor is None:
        if params.mscale and params.mscale_all_dim:  # DeepSeek-style; both must be set (and non-zero)
            attention_factor = float(mscale(factor, params.mscale) / mscale(factor, params.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(params.beta_fast or 32), correction_dim(params.beta_slow or 1)
    if params.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as transformers does

    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the original frequency is kept (extrapolated)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor

"""diffulex_layers.rope against transformers' own RoPE code, for every supported type and both config dialects."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from transformers import Qwen3Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update  # noqa: E402

from diffulex_layers.rope import RopeParameters, inv_freq_and_scale, rope_parameters  # noqa: E402

# (rope_type, theta, scaling fields, head_dim, max_position_embeddings)
CASES = {
    "default-qwen3": ("default", 1e6, {}, 128, 40960),
    "default-small": ("default", 10000.0, {}, 64, 2048),
    "linear-2": ("linear", 1e6, {"factor": 2.0}, 128, 32768),
    "linear-4.5": ("linear", 5e5, {"factor": 4.5}, 64, 8192),
    "dynamic-2": ("dynamic", 1e6, {"factor": 2.0}, 128, 4096),
    "dynamic-3.5": ("dynamic", 10000.0, {"factor": 3.5}, 64, 2048),
    "yarn-qwen3": ("yarn", 1e6, {"factor": 4.0, "original_max_position_embeddings": 32768}, 128, 131072),
    "yarn-attention-factor": ("yarn", 1e6, {"factor": 4.0, "original_max_position_embeddings": 32768,
                                            "attention_factor": 1.5}, 128, 131072),
    "yarn-mscale": ("yarn", 10000.0, {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                                      "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}, 64, 163840),
    "yarn-betas-no-truncate": ("yarn", 1e6, {"factor": 2.0, "original_max_position_embeddings": 16384,
                                             "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}, 128, 32768),
    "yarn-factor-1": ("yarn", 1e6, {"factor": 1.0, "original_max_position_embeddings": 32768}, 128, 32768),
    "yarn-original-from-max": ("yarn", 1e6, {"factor": 4.0}, 128, 32768),
    "llama3-8": ("llama3", 5e5, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}, 128, 131072),
    "llama3-32": ("llama3", 5e5, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}, 64, 131072),
}


def config_json(dialect: str, rope_type: str, theta: float, scaling: dict, head_dim: int, max_pos: int) -> dict:
    """A config.json as transformers 4 (rope_theta + rope_scaling) or 5 (rope_parameters) writes it."""
    base = {"head_dim": head_dim, "max_position_embeddings": max_pos, "hidden_size": 256,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1}
    if dialect == "t4":
        return {**base, "rope_theta": theta,
                "rope_scaling": {"rope_type": rope_type, **scaling} if rope_type != "default" else None}
    return {**base, "rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **scaling}}


class Qwen3Rope(nn.Module):
    """The state-keeping part of transformers 5's ``Qwen3RotaryEmbedding``, copied, around the real
    ``ROPE_INIT_FUNCTIONS`` and ``dynamic_rope_update``. (Importing ``modeling_qwen3`` itself costs
    about 3.5 s, more than this whole file should take.)"""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        if self.rope_type == "default":  # Qwen3RotaryEmbedding.compute_default_rope_parameters
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            base = config.rope_parameters["rope_theta"]
            inv_freq, self.attention_scaling = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> None:
        pass


def assert_same(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 0.0) -> None:
    """Bit-for-bit (or within ``rtol``) equality. Not torch.testing.assert_close: its first call
    imports torch.distributed.tensor, about 2 s."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (ours.dtype, ref.dtype, ours.shape, ref.shape)
    ok = torch.equal(ours, ref) if rtol == 0 else torch.allclose(ours, ref, rtol=rtol, atol=0.0)
    assert ok, f"max relative difference {((ours - ref).abs() / ref.abs()).max().item():.3g} > {rtol}"


def reference(config: dict, seq_len: int | None = None) -> tuple[torch.Tensor, float, Qwen3Config]:
    """What Qwen3's rotary embedding holds after init (and after its dynamic update for ``seq_len``)."""
    hf = Qwen3Config(**config)
    emb = Qwen3Rope(hf)
    if seq_len is not None:
        emb(torch.zeros(1), torch.arange(seq_len)[None])  # forward runs `dynamic_rope_update` first
    return emb.inv_freq, emb.attention_scaling, hf


@pytest.mark.parametrize("dialect", ["t4", "t5"])
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("dynamic")])
def test_matches_transformers(case: str, dialect: str) -> None:
    rope_type, theta, scaling, head_dim, max_pos = CASES[case]
    config = config_json(dialect, rope_type, theta, scaling, head_dim, max_pos)
    params = rope_parameters(config)
    assert params.rope_type == rope_type and params.theta == theta

    inv_freq, scale = inv_freq_and_scale(params, head_dim, max_pos)
    ref_inv_freq, ref_scale, hf = reference(config)
    assert hf.rope_parameters["rope_type"] == rope_type  # transformers read the config as we meant it
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (head_dim // 2,)
    assert_same(inv_freq, ref_inv_freq)
    assert scale == ref_scale
    if rope_type != "default":  # the registry entry the model calls, directly
        fn_inv_freq, fn_scale = ROPE_INIT_FUNCTIONS[rope_type](hf)
        assert_same(inv_freq, fn_inv_freq)
        assert scale == fn_scale


@pytest.mark.parametrize("dialect", ["t4", "t5"])
@pytest.mark.parametrize("case", ["dynamic-2", "dynamic-3.5"])
@pytest.mark.parametrize("seq_ratio", [None, 0.05, 1.0, 1.0005, 1.7, 3.0])
def test_dynamic_matches_transformers_update(case: str, dialect: str, seq_ratio: float | None) -> None:
    rope_type, theta, scaling, head_dim, max_pos = CASES[case]
    config = config_json(dialect, rope_type, theta, scaling, head_dim, max_pos)
    seq_len = None if seq_ratio is None else math.ceil(seq_ratio * max_pos)
    inv_freq, scale = inv_freq_and_scale(rope_parameters(config), head_dim, max_pos, seq_len)
    ref_inv_freq, ref_scale, hf = reference(config, seq_len)
    assert_same(inv_freq, ref_inv_freq)
    assert scale == ref_scale == 1.0
    # called directly with a Python int, the registry entry computes the new base in float64 instead
    assert_same(inv_freq, ROPE_INIT_FUNCTIONS["dynamic"](hf, seq_len=seq_len)[0], rtol=1e-6)
    default, _ = inv_freq_and_scale(RopeParameters("default", theta), head_dim, max_pos)
    assert torch.equal(inv_freq, default) == (seq_len is None or seq_len <= max_pos)


def test_default_spellings() -> None:
    """null / {"rope_type": "default"} / {"type": "default"} / nothing at all all mean plain RoPE."""
    expected = RopeParameters("default", 1e6)
    for extra in ({"rope_scaling": None}, {"rope_scaling": {"rope_type": "default"}},
                  {"rope_scaling": {"type": "default"}}, {"rope_parameters": None}, {}):
        assert rope_parameters({"rope_theta": 1e6, **extra}) == expected
    assert rope_parameters({}) == RopeParameters("default", 10000.0)
    assert rope_parameters({}, default_theta=5e5).theta == 5e5
    assert rope_parameters({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == expected
    assert rope_parameters({"rope_theta": 1e6, "partial_rotary_factor": 1.0}) == expected


def test_legacy_type_key_and_precedence() -> None:
    linear = {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_parameters(linear) == RopeParameters("linear", 1e6, factor=2.0)
    both = {"rope_scaling": {"rope_type": "linear", "type": "dynamic", "factor": 2.0}}
    assert rope_parameters(both).rope_type == "linear"
    # rope_theta inside the dict wins over the top-level one; rope_scaling wins over rope_parameters
    assert rope_parameters({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0}}).theta == 2.0
    mixed = {"rope_scaling": {"rope_type": "linear", "factor": 3.0}, "rope_parameters": {"rope_type": "default"}}
    assert rope_parameters(mixed).factor == 3.0


def test_top_level_original_max_positions_takes_priority_like_transformers() -> None:
    config = {"rope_theta": 1e6, "max_position_embeddings": 131072, "original_max_position_embeddings": 8192,
              "head_dim": 128, "hidden_size": 256, "num_attention_heads": 2, "num_hidden_layers": 1,
              "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    params = rope_parameters(config)
    assert params.original_max_positions == 8192
    ref_inv_freq, ref_scale, _ = reference(config)
    inv_freq, scale = inv_freq_and_scale(params, 128, 131072)
    assert_same(inv_freq, ref_inv_freq)
    assert scale == ref_scale


def test_yarn_null_truncate_means_no_truncation_like_transformers() -> None:
    config = config_json("t5", "yarn", 1e6, {"factor": 4.0, "original_max_position_embeddings": 4096,
                                             "truncate": None}, 128, 16384)
    assert rope_parameters(config).truncate is False
    inv_freq, _ = inv_freq_and_scale(rope_parameters(config), 128, 16384)
    assert_same(inv_freq, reference(config)[0])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
         "rope_scaling.rope_type = 'longrope' is not supported (supported: default, linear, dynamic, yarn, llama3)"),
        ({"rope_scaling": {"type": "su"}}, "rope_scaling.type = 'su' is not supported"),
        ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e6}},
         "rope_parameters.rope_type = 'proportional' is not supported"),
        ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor = None is missing"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 0}}, "rope_scaling.factor = 0 must be a number > 0"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": -1.0}}, "rope_parameters.factor = -1.0 must be"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor = '2' must be"),
        ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "rope_scaling.factor = nan must be"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0}},
         "rope_scaling.attention_factor = 0.0 must be a number > 0"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}}, "rope_scaling.beta_fast = -1"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}}, "rope_scaling.truncate = 'yes'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}},
         "rope_scaling.original_max_position_embeddings = 0 must be an integer > 0"),
        ({"max_position_embeddings": 40960.5, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
         "max_position_embeddings = 40960.5 must be an integer > 0"),
        ({"max_position_embeddings": 8192, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                            "high_freq_factor": 4.0}},
         "rope_scaling.low_freq_factor = None is missing"),
        ({"max_position_embeddings": 8192, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
         "rope_scaling.high_freq_factor = 4.0 must be greater than low_freq_factor (4.0)"),
        ({"rope_theta": 0}, "rope_theta = 0 must be a number > 0"),
        ({"rope_parameters": {"rope_theta": "1e6"}}, "rope_parameters.rope_theta = '1e6' must be a number > 0"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5 is not supported"),
        ({"rope_parameters": {"rope_theta": 1e6, "partial_rotary_factor": 0.25}},
         "rope_parameters.partial_rotary_factor = 0.25 is not supported"),
        ({"rope_parameters": {"rope_theta": 1e6, "mrope_section": [16, 24, 24]}}, "rope_parameters.mrope_section"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type"),
        ({"rope_scaling": ["linear", 2.0]}, "rope_scaling = ['linear', 2.0] must be a mapping or null"),
    ],
)
def test_config_errors_name_the_field(config: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        rope_parameters(config)
    assert message in str(err.value)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="rope_type = 'ntk' is not supported"):
        RopeParameters("ntk", 1e6)
    with pytest.raises(ValueError, match="factor = None is missing; rope_type 'yarn' needs it"):
        RopeParameters("yarn", 1e6)
    with pytest.raises(ValueError, match="theta = -1.0 must be a number > 0"):
        RopeParameters("default", -1.0)
    with pytest.raises(ValueError, match="head_dim = 127"):
        inv_freq_and_scale(RopeParameters("default", 1e6), 127, 4096)
    # yarn / llama3 without an original length fall back to max_positions, as transformers' config does
    yarn = RopeParameters("yarn", 1e6, factor=4.0)
    assert_same(inv_freq_and_scale(yarn, 128, 32768)[0],
                               inv_freq_and_scale(RopeParameters("yarn", 1e6, factor=4.0,
                                                                 original_max_positions=32768), 128, 32768)[0],
                               )

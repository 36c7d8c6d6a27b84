"""Dream specifics: config keys, checkpoint names, released sizes; ``FamilySuite`` runs the checks
every family passes with them. The shared blocks are tested in plugins/diffulex-layers/tests."""

from diffulex_dream.model import DreamForDiffusionLM, build_dream, to_hf_state_dict
from diffulex_layers.testing import FamilySuite

DO_NOT_DIVIDE = "hidden_size=.*num_attention_heads=.*num_key_value_heads=.*do not divide"


class TestDream(FamilySuite):
    family = "dream"
    plugin = "diffulex_dream"
    registered = [("dream", "diffulex_dream.model:build_dream")]
    model_class = DreamForDiffusionLM
    build = staticmethod(build_dream)
    export = staticmethod(to_hf_state_dict)
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 48, "vocab_size": 100, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}  # fmt: skip
    # Dream-7B
    released = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                "intermediate_size": 18944, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "max_position_embeddings": 131072, "tie_word_embeddings": False}  # fmt: skip
    config_cases = [
        ({}, {"kv_heads": 2, "inter": 128, "vocab": 256, "eps": 1e-6, "rope_theta": 10000.0, "max_positions": 2048,
              "qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False, "tie": False}),
        ({"num_key_value_heads": None, "num_attention_heads": 8}, {"kv_heads": 8, "head_dim": 8}),  # null: = heads
        ({"tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 4096, "rms_norm_eps": None},
         {"tie": True, "rope_theta": 1e6, "max_positions": 4096, "eps": 1e-6}),
        ({"attention_bias": False, "head_dim": 4}, {"qkv_bias": True, "head_dim": 16}),  # Qwen2: not config keys
    ]  # fmt: skip
    rejected = [({"hidden_size": 30}, DO_NOT_DIVIDE),
                ({"num_attention_heads": 4, "num_key_value_heads": 3}, DO_NOT_DIVIDE)]
    max_positions_key = "max_position_embeddings"
    tiny_logits = 100
    mlp_weights = tuple(f"model.layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down"))
    tie_key = "tie_word_embeddings"  # no bias switch: Qwen2 has q/k/v biases, no others

    def check_released(self, model):
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.qkv_proj.weight.shape == ((28 + 2 * 4) * 128, 3584)
        assert attn.qkv_proj.bias.shape == ((28 + 2 * 4) * 128,) and attn.o_proj.bias is None
        assert mlp.gate_up_proj.weight.shape == (2 * 18944, 3584) and mlp.gate_up_proj.bias is None
        assert model.lm_head.weight.shape == (152064, 3584)
        assert 7.5e9 < sum(p.numel() for p in model.parameters()) < 7.7e9

    def check_checkpoint(self, state_dict, tie, bias):
        layer = "model.layers.1"
        assert {"model.embed_tokens.weight", "model.norm.weight", f"{layer}.input_layernorm.weight",
                f"{layer}.post_attention_layernorm.weight", f"{layer}.self_attn.o_proj.weight",
                f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight", f"{layer}.mlp.down_proj.weight",
                *(f"{layer}.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias"))
                } <= set(state_dict)  # fmt: skip
        # per layer: 2 norms, q/k/v weight+bias, o, gate, up, down
        assert len(state_dict) == 2 + (not tie) + 2 * 12
        assert state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)

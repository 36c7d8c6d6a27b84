"""LLaDA specifics: config keys, checkpoint names, released sizes; ``FamilySuite`` runs the checks
every family passes with them. The shared blocks are tested in plugins/diffulex-layers/tests."""

from diffulex_layers.testing import FamilySuite, to_param_name
from diffulex_llada.model import LLaDAForDiffusionLM, build_llada, to_hf_state_dict

DO_NOT_DIVIDE = "d_model=.*n_heads=.*n_kv_heads=.*do not divide"


class TestLLaDA(FamilySuite):
    family = "llada"
    plugin = "diffulex_llada"
    registered = [("llada", "diffulex_llada.model:build_llada")]
    model_class = LLaDAForDiffusionLM
    build = staticmethod(build_llada)
    export = staticmethod(to_hf_state_dict)
    tiny = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 48,
            "vocab_size": 100, "embedding_size": 128, "rms_norm_eps": 1e-5, "include_bias": False}  # fmt: skip
    # LLaDA-8B
    released = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
                "vocab_size": 126464, "embedding_size": 126464, "rms_norm_eps": 1e-5, "include_bias": False,
                "include_qkv_bias": False, "rope_theta": 500000.0, "max_sequence_length": 4096,
                "weight_tying": False}  # fmt: skip
    config_cases = [
        ({}, {"kv_heads": 2, "inter": 128, "vocab": 256, "eps": 1e-5, "rope_theta": 10000.0, "max_positions": 2048}),
        ({"n_kv_heads": None, "n_heads": 8}, {"kv_heads": 8, "head_dim": 8}),  # null: as many as n_heads
        ({"mlp_ratio": 3, "d_model": 32}, {"inter": 96}),
        ({"mlp_ratio": 3, "mlp_hidden_size": 40}, {"inter": 40}),
        ({"vocab_size": 100}, {"vocab": 100}),
        ({"vocab_size": 100, "embedding_size": 128}, {"vocab": 128}),  # the padded embedding wins
        ({"include_bias": True}, {"qkv_bias": True, "o_bias": True, "mlp_bias": True}),
        ({"include_qkv_bias": True}, {"qkv_bias": True, "o_bias": False, "mlp_bias": False}),
        ({"weight_tying": True, "rope_theta": 5e5, "max_sequence_length": 4096, "rms_norm_eps": None},
         {"tie": True, "rope_theta": 5e5, "max_positions": 4096, "eps": 1e-5, "qk_norm": False}),
    ]  # fmt: skip
    rejected = [({"d_model": 30}, DO_NOT_DIVIDE), ({"n_heads": 4, "n_kv_heads": 3}, DO_NOT_DIVIDE)]
    max_positions_key = "max_sequence_length"
    tiny_logits = 128  # embedding_size: the padded vocabulary
    # LLaDA's ff_proj is the gate and up_proj the up projection
    mlp_weights = tuple(f"model.transformer.blocks.0.{n}.weight" for n in ("ff_proj", "up_proj", "ff_out"))
    tie_key, bias_key = "weight_tying", "include_bias"
    lm_head_name = "model.transformer.ff_out.weight"

    def check_released(self, model):
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.qkv_proj.weight.shape == (3 * 4096, 4096) and attn.qkv_proj.bias is None
        assert mlp.gate_up_proj.weight.shape == (2 * 12288, 4096)
        assert model.lm_head.weight.shape == (126464, 4096)
        assert 7.9e9 < sum(p.numel() for p in model.parameters()) < 8.1e9

    def check_checkpoint(self, state_dict, tie, bias):
        block = "model.transformer.blocks.1"
        assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight",
                *(f"{block}.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj",
                                                  "ff_out", "attn_norm", "ff_norm"))} <= set(state_dict)  # fmt: skip
        # per layer: 2 norms; q, k, v, attn_out, ff_proj, up_proj, ff_out (each with a bias if include_bias)
        assert len(state_dict) == 2 + (not tie) + 2 * (9 + 7 * bias)
        assert ("model.transformer.blocks.0.q_proj.bias" in state_dict) is bias
        assert ("model.transformer.blocks.0.attn_out.bias" in state_dict) is bias
        assert state_dict["model.transformer.blocks.0.k_proj.weight"].shape == (2 * 8, 32)
        lm_head = to_param_name(self.lm_head_name, LLaDAForDiffusionLM.packed_modules_mapping)
        assert lm_head == ("lm_head.weight", None)  # the longest key wins over the blocks' ff_out

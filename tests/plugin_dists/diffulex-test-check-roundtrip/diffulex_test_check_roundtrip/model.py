"""A tiny LM with a packed k/v projection (rows ``k`` then ``v``, filled through its weight_loader)."""

import torch
from torch import nn


class KVProjection(nn.Linear):
    def __init__(self, hidden: int) -> None:
        super().__init__(hidden, 2 * hidden, bias=False)
        self.shard_slices = {"k": (0, hidden), "v": (hidden, hidden)}
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight, shard_id):
        start, size = self.shard_slices[shard_id]
        param.data.narrow(0, start, size).copy_(loaded_weight)


class TinyLM(nn.Module):
    packed_modules_mapping = {"k_proj": ("kv_proj", "k"), "v_proj": ("kv_proj", "v")}

    def __init__(self, config=None) -> None:
        super().__init__()
        config = dict(config or {})
        vocab, hidden = config.get("vocab_size", 32), config.get("hidden_size", 8)
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.kv_proj = KVProjection(hidden)
        self.final_scale = nn.Parameter(torch.ones(hidden))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        return self.lm_head((torch.tanh(k) * v + x) * self.final_scale)


class SwappedLM(TinyLM):
    packed_modules_mapping = {"k_proj": ("kv_proj", "v"), "v_proj": ("kv_proj", "k")}  # the bug


def build_good(config=None):
    return TinyLM(config)


def build_swapped(config=None):
    return SwappedLM(config)


def to_checkpoint(model):
    k, v = model.kv_proj.weight.chunk(2, dim=0)
    return {"embed_tokens.weight": model.embed_tokens.weight, "k_proj.weight": k, "v_proj.weight": v,
            "final_scale": model.final_scale, "lm_head.weight": model.lm_head.weight}


def to_checkpoint_missing(model):
    tensors = to_checkpoint(model)
    del tensors["final_scale"]
    return tensors


def to_checkpoint_extra(model):
    return {**to_checkpoint(model), "extra_head.weight": model.lm_head.weight}

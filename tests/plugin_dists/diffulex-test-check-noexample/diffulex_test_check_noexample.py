"""Two healthy families: ``noexample-plain`` gives no example (``diffulex check`` skips its build and
round trip, saying so), ``noexample-attr`` carries one on its (lazy) factory: ``example_config``."""

from diffulex_core import hookimpl


def build_plain(config=None):
    import torch

    return torch.nn.Sequential(torch.nn.Embedding(16, 4), torch.nn.Linear(4, 16))


def build_attr(config=None):
    import torch

    config = dict(config or {})
    vocab, hidden = config.get("vocab_size", 16), config.get("hidden_size", 4)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab))


build_attr.example_config = {"vocab_size": 12, "hidden_size": 6}


@hookimpl
def diffulex_register_families(register):
    register("noexample-plain", build_plain)
    register("noexample-attr", "diffulex_test_check_noexample:build_attr")

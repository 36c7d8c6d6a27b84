"""Child process for tests/test_load_safety.py: reload a ~0.4 GiB checkpoint and send ourselves SIGINT.

``python interrupt_worker.py DIR AT SIGNALS [AT SIGNALS ...]`` runs one scenario per pair, in
order, each on a model of its own: it loads DIR/old (every weight 1), then starts a timer that
sends SIGINT ``SIGNALS`` times (1 ms apart) after ``AT`` times that load's duration, and loads
DIR/new (every weight 2) into the same model. Each scenario prints one JSON line: its ``at`` and
``signals``, where the interrupt surfaced and what the model holds afterwards ("old", "new",
"marked" or "mixed"); stderr says which scenario runs, so a crash names it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import torch
from torch import nn

from diffulex_core.checkpoint import ResolvedWeight
from diffulex_core.errors import PartialLoadError
from diffulex_core.loader import load_checkpoint

LAYERS, WIDTH = 8, 3584  # 8 x 3584 x 3584 float32 = 0.38 GiB


class Model(nn.Module):
    """Big plain layers (read straight into place) and one tensor that goes through a one-argument
    loader (run first, watched), so an interrupt can land in either phase."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))
        self.scale = nn.Parameter(torch.zeros(WIDTH))

    def resolve_checkpoint_weight(self, name, ctx):
        if name == "scale_source":
            return ResolvedWeight(loader=lambda t: self.scale.data.copy_(t), covers=("scale",))
        return None

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x * self.scale


def write(directory: str, value: float) -> None:
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return
    os.makedirs(directory, exist_ok=True)
    tensors = {f"layers.{i}.weight": torch.full((WIDTH, WIDTH), value) for i in range(LAYERS)}
    tensors["scale_source"] = torch.full((WIDTH,), value)
    save_file(tensors, os.path.join(directory, "model.safetensors"))


def state_of(model: Model) -> str:
    if getattr(model, "diffulex_partial_load", None) is not None:
        try:
            model(torch.zeros(1, WIDTH))
        except PartialLoadError:
            return "marked"
        return "marked-but-usable"
    values = {float(v) for t in model.parameters() for v in (t.detach().min(), t.detach().max())}
    return {frozenset({1.0}): "old", frozenset({2.0}): "new"}.get(frozenset(values), "mixed")


def scenario(root: str, at: float, signals: int) -> dict:
    model = Model()
    started = time.perf_counter()
    load_checkpoint(model, os.path.join(root, "old"))
    delay = at * (time.perf_counter() - started)
    assert state_of(model) == "old"

    def interrupt() -> None:
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.001)

    loading = [True]
    late = []

    def on_sigint(signum, frame) -> None:  # KeyboardInterrupt while the load runs; counted after it
        if loading[0]:
            raise KeyboardInterrupt
        late.append(signum)

    signal.signal(signal.SIGINT, on_sigint)
    timer = threading.Timer(delay, interrupt)
    surfaced = "never"
    try:
        try:
            timer.start()
            load_checkpoint(model, os.path.join(root, "new"))
        finally:
            loading[0] = False
    except KeyboardInterrupt:
        loading[0] = False
        surfaced = "load"
    timer.join()
    state = state_of(model)  # Python code: a signal still pending is handled here, by on_sigint
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as the next scenario's process would start
    return {"at": at, "signals": signals, "surfaced": surfaced, "state": state, "delay": delay, "late": len(late)}


def main() -> None:
    root, pairs = sys.argv[1], sys.argv[2:]
    write(os.path.join(root, "old"), 1.0)
    write(os.path.join(root, "new"), 2.0)
    for at, signals in zip(pairs[::2], pairs[1::2], strict=True):
        print(f"scenario at={at} signals={signals}", file=sys.stderr, flush=True)
        print(json.dumps(scenario(root, float(at), int(signals))), flush=True)


if __name__ == "__main__":
    main()

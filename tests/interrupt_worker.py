"""Child process for tests/test_load_safety.py: reload a ~0.4 GiB checkpoint and send ourselves SIGINT.

``python interrupt_worker.py DIR AT SIGNALS`` loads DIR/old (every weight 1), then starts a
timer that sends SIGINT ``SIGNALS`` times (1 ms apart) after ``AT`` times the first load's
duration, and loads DIR/new (every weight 2) into the same model. It prints one JSON line: where the interrupt surfaced and
what the model holds afterwards ("old", "new", "marked" or "mixed").
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
    values = {float(t.detach().min()) for t in model.parameters()} | {float(t.detach().max()) for t in model.parameters()}
    return {frozenset({1.0}): "old", frozenset({2.0}): "new"}.get(frozenset(values), "mixed")


def main() -> None:
    root, at, signals = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    write(os.path.join(root, "old"), 1.0)
    write(os.path.join(root, "new"), 2.0)
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
    state = state_of(model)
    print(json.dumps({"surfaced": surfaced, "state": state, "delay": delay, "late": len(late)}), flush=True)


if __name__ == "__main__":
    main()

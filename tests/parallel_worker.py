"""One rank of a multi-process load test: ``python parallel_worker.py SCENARIO RANK WORLD PORT DIR``.

Launched by ``tests/rank_launcher.py`` the way ``torchrun`` launches an engine: separate
processes joined by a gloo process group over TCP. Each rank writes ``DIR/rank{R}.json`` (its
load report, or the error it raised) and ``DIR/rank{R}.safetensors`` (its parameters and, on
rank 0, the logits); the test compares them with a single-process load.

A SCENARIO file holding a list runs each of its scenarios in turn in the one process group (each
``{"name": ..., ...}`` into ``DIR/<name>/``), every rank meeting at a barrier before and after
each, so one launch serves several checks; stdout says which scenario runs, so a crash names it.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diffulex_core.loader import load_checkpoint, load_model

TIMEOUT = timedelta(seconds=60)  # a collective that waits longer than this fails instead of hanging


def build(scenario: dict) -> torch.nn.Module:
    """The scenario's model, built on the meta device as this rank's shard."""
    with torch.device("meta"):
        if scenario["kind"] == "sdar_moe":
            from diffulex_sdar.model import build_sdar_moe

            return build_sdar_moe(scenario["config"])
        if scenario["kind"] == "moe":
            from diffulex_layers.testing import TinyMoeLM

            return TinyMoeLM(scenario["config"])
        from diffulex_llada.model import build_llada

        return build_llada(scenario["config"])


def load(scenario: dict, rank: int) -> tuple[torch.nn.Module, Any]:
    """A family model loaded the scenario's way: ``load_checkpoint`` into a meta-built model, or
    (``lora``) the seed's ``load_model`` with an adapter into a model built on the CPU."""
    if "lora" in scenario:
        from diffulex_dream.model import build_dream

        model = build_dream(scenario["config"]).eval()
        load_model(model, SimpleNamespace(model=scenario["checkpoint"], model_name="dream", use_lora=True,
                                          lora_path=scenario["lora"], pre_merge_lora=scenario["merge"]))
        return model, model.diffulex_load_report
    model = build(scenario)
    checkpoint = scenario["checkpoints"][rank] if "checkpoints" in scenario else scenario["checkpoint"]
    return model, load_checkpoint(model, checkpoint, device="cpu")


def run(scenario: dict, out: Path, rank: int) -> dict:
    model, report = load(scenario, rank)
    tensors = {f"param.{name}": t.detach().clone() for name, t in model.state_dict().items()}
    ids = torch.tensor(scenario["input_ids"])
    with torch.no_grad():
        logits = model(ids)
    if rank == 0:
        tensors["logits"] = logits.contiguous()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    return {"ok": True, "report": report.to_dict()}


def run_one(scenario: dict, out: Path, rank: int) -> None:
    try:
        result = run(scenario, out, rank)
    except Exception as exc:
        result = {"ok": False, "type": type(exc).__name__, "message": str(exc),
                  "cause": type(exc.__cause__).__name__ if exc.__cause__ else None,
                  "traceback": traceback.format_exc()}
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))


def main() -> None:
    scenario_file, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    out = Path(sys.argv[5])
    scenarios = json.loads(Path(scenario_file).read_text())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT)
    if isinstance(scenarios, dict):
        run_one(scenarios, out, rank)
    else:
        for scenario in scenarios:
            print(f"rank {rank}: scenario {scenario['name']}", flush=True)
            (out / scenario["name"]).mkdir(exist_ok=True)
            dist.barrier()  # every rank starts the scenario together, the last one's collectives all done
            run_one(scenario, out / scenario["name"], rank)
    dist.barrier()  # no rank closes its connections while another still receives from it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

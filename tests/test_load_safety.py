"""A failed or interrupted load never leaves a silently mixed model; devices, meta-built models,
computed buffers and two tensors for one destination (issue 19, items 3, 6, 7, 12, 13, 14)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffulex_core.checkpoint import ResolvedWeight
from diffulex_core.empty_weights import init_empty_weights
from diffulex_core.errors import LoadApplyError, LoadError, LoadPlanError, LoadWarning, PartialLoadError
from diffulex_core.loader import load_checkpoint, load_model, plan_checkpoint

WORKER = Path(__file__).parent / "interrupt_worker.py"


def write(directory: Path, tensors: dict, name: str = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / name)
    return directory


def two_layers(value: float) -> dict:
    return {"a.weight": torch.full((4, 4), value), "b.weight": torch.full((4, 4), value)}


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def values(model: nn.Module) -> set[float]:
    return {float(v) for p in model.parameters() for v in p.detach().unique()}


# --------------------------------------------------------------------------- interrupts (item 3)


def test_sigint_at_any_instant_of_a_reload_leaves_old_new_or_marked(tmp_path):
    """A real SIGINT (once, or twice 1 ms apart) at several instants of a 0.4 GiB reload, each
    scenario on its own model, all in one fresh process (a crash names its scenario on stderr)."""
    scenarios = [(at, signals) for at in (0.0, 0.25, 0.5) for signals in (1, 2)]
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path), *(str(x) for pair in scenarios for x in pair)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(o["at"], o["signals"]) for o in outcomes] == scenarios, (done.stdout, done.stderr[-3000:])
    for outcome in outcomes:
        at, signals = outcome["at"], outcome["signals"]
        assert outcome["state"] in ("old", "new", "marked"), (at, signals, outcome)
        if outcome["state"] == "old":  # stopped before anything stayed written: the interrupt surfaced
            assert outcome["surfaced"] == "load", outcome
        if signals == 1:  # one Ctrl-C never aborts: the load stops whole or finishes
            assert outcome["state"] in ("old", "new"), (at, outcome)
    assert any(o["surfaced"] == "load" for o in outcomes), outcomes


class CodedModel(TwoLayers):
    """``b.weight`` goes through a weight_loader (dry-run on meta, run after the plain copies);
    ``hook`` is called with each real tensor it gets."""

    def __init__(self, hook) -> None:
        super().__init__()

        def weight_loader(param, tensor):
            if not tensor.is_meta:
                hook()
            param.data.copy_(tensor)

        self.b.weight.weight_loader = weight_loader


def test_one_ctrl_c_while_bytes_move_finishes_the_load_then_interrupts(tmp_path):
    model = CodedModel(lambda: signal.raise_signal(signal.SIGINT))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint(model, write(tmp_path / "new", two_layers(2.0)))
    assert values(model) == {2.0}  # finished, then the held Ctrl-C was delivered
    assert getattr(model, "diffulex_partial_load", None) is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_aborts_and_marks_the_model_until_a_full_load(tmp_path):
    calls = []

    def twice():
        calls.append(1)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    model = CodedModel(twice)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    with pytest.raises(KeyboardInterrupt) as caught:
        load_checkpoint(model, write(tmp_path / "new", two_layers(2.0)))
    assert "marked as partly written" in "".join(getattr(caught.value, "__notes__", []))
    mark = model.diffulex_partial_load
    assert mark.checkpoint == str(tmp_path / "new") and mark.reason == "KeyboardInterrupt"
    assert mark.report.partial == "KeyboardInterrupt"
    assert "left the model partly written (marked): KeyboardInterrupt" in mark.report.summary()
    with pytest.raises(PartialLoadError, match=r"partly written by the failed load of .*new"):
        model(torch.zeros(1, 4))
    with pytest.raises(PartialLoadError):
        model.a(torch.zeros(1, 4))  # submodules too
    model.b.weight.weight_loader = lambda param, tensor: param.data.copy_(tensor)
    load_checkpoint(model, tmp_path / "new")  # a load that writes every parameter clears the mark
    assert getattr(model, "diffulex_partial_load", None) is None
    assert model(torch.ones(1, 4)).shape == (1, 4)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class LoaderModel(TwoLayers):
    """``a.weight`` through a one-argument loader (run first, watched, undoable)."""

    def __init__(self, hook=lambda: None) -> None:
        super().__init__()
        self.hook = hook

    def resolve_checkpoint_weight(self, name, ctx):
        if name == "a_source":
            def load(tensor):
                self.hook()
                self.a.weight.data.copy_(tensor)
            return ResolvedWeight(loader=load)
        return None


def test_ctrl_c_while_model_code_runs_puts_everything_back(tmp_path):
    model = LoaderModel(lambda: signal.raise_signal(signal.SIGINT))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    tensors = {"a_source": torch.full((4, 4), 2.0), "b.weight": torch.full((4, 4), 2.0)}
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint(model, write(tmp_path, tensors))
    assert values(model) == {1.0}  # the loader's write was undone; the plain copy never started
    assert getattr(model, "diffulex_partial_load", None) is None


def test_failures_without_undo_mark_the_model(tmp_path):
    """load_model (no undo copies) with failing model code: LoadApplyError, and the model is marked."""
    def failing():
        raise RuntimeError("disk on fire")

    model = CodedModel(failing)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    path = write(tmp_path, two_layers(2.0))
    with pytest.raises(LoadApplyError, match="disk on fire") as caught:
        load_model(model, SimpleNamespace(model=str(path)))
    assert "marked as partly written" in "".join(caught.value.__notes__)
    assert values(model) == {1.0, 2.0}  # the plain copy landed: a mix, and the mark says so
    with pytest.raises(PartialLoadError, match="disk on fire"):
        model(torch.zeros(1, 4))

    model = LoaderModel()  # rollback=False: what the watched loader wrote cannot be undone
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    model.b.weight.weight_loader = lambda param, tensor: (_ for _ in ()).throw(RuntimeError("no .item() on meta"))
    tensors = {"a_source": torch.full((4, 4), 2.0), "b.weight": torch.full((4, 4), 2.0)}
    with pytest.raises(LoadApplyError, match="not undone") as caught:
        load_checkpoint(model, write(tmp_path / "two", tensors), rollback=False)
    assert caught.value.report.partial.startswith("LoadApplyError")
    assert model.diffulex_partial_load.report is caught.value.report
    with pytest.raises(PartialLoadError):
        model(torch.zeros(1, 4))


def test_a_failed_load_with_undo_leaves_no_mark(tmp_path):
    model = LoaderModel(lambda: (_ for _ in ()).throw(RuntimeError("bad loader")))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    tensors = {"a_source": torch.full((4, 4), 2.0), "b.weight": torch.full((4, 4), 2.0)}
    with pytest.raises(LoadPlanError, match="bad loader"):
        load_checkpoint(model, write(tmp_path, tensors))
    assert values(model) == {1.0}
    assert getattr(model, "diffulex_partial_load", None) is None
    model(torch.zeros(1, 4))


# --------------------------------------------------------------------------- devices (item 6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_an_unavailable_device_is_a_typed_error_before_anything_changes(tmp_path, device):
    path = write(tmp_path, two_layers(2.0))
    with torch.device("meta"):
        model = TwoLayers()
    with pytest.raises(LoadError, match=f"device '{device}'.*not available"):
        load_checkpoint(model, path, device=device)
    assert all(p.is_meta for p in model.parameters())


def test_a_device_index_past_the_count_and_nonsense_devices_are_named(tmp_path):
    path = write(tmp_path, two_layers(2.0))
    model = TwoLayers()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LoadError, match="device 'nope' is not a torch device"):
        load_checkpoint(model, path, device="nope")
    with pytest.raises(LoadError, match="device 'meta'"):
        load_checkpoint(model, path, device="meta")
    if torch.cuda.is_available():
        with pytest.raises(LoadError, match=r"sees \d+ cuda device"):
            load_checkpoint(model, path, device=f"cuda:{torch.cuda.device_count()}")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------- load_model on meta (item 7)


def test_load_model_materializes_a_meta_model_on_the_default_device(tmp_path):
    path = write(tmp_path, two_layers(2.0))
    with torch.device("meta"):
        model = TwoLayers()
    assert load_model(model, SimpleNamespace(model=str(path))) is model
    assert {p.device.type for p in model.parameters()} == {"cpu"} and values(model) == {2.0}

    with torch.device("meta"):
        model = TwoLayers()
    load_model(model, SimpleNamespace(model=str(path), device="cpu"))  # config.device where it has one
    assert values(model) == {2.0}

    with torch.device("meta"):
        model = TwoLayers()
    with pytest.raises(LoadError, match="device 'nope'"):
        load_model(model, SimpleNamespace(model=str(path), device="nope"))
    assert all(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------- the strict=False warning (item 12)


def test_the_strict_false_warning_points_to_the_returned_report(tmp_path, caplog):
    tensors = {**two_layers(2.0), **{f"stray.{i}": torch.ones(1) for i in range(12)}}
    with caplog.at_level(logging.WARNING, logger="diffulex_core.loader"):
        report = load_checkpoint(TwoLayers(), write(tmp_path, tensors), strict=False)
    assert len(report.problems) == 12
    assert "the LoadReport load_checkpoint returned has them all" in caplog.text
    assert "LoadPlanError" not in caplog.text
    with pytest.warns(LoadWarning, match="model.diffulex_load_report has them all"):
        load_model(TwoLayers(), SimpleNamespace(model=str(tmp_path)))


# --------------------------------------------------------------------------- computed buffers (item 13)


class Rotary(nn.Module):
    """Shaped like Diffulex's RotaryEmbedding: a non-persistent cos/sin cache computed in __init__."""

    def __init__(self, dim: int = 8, positions: int = 16) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)


class WithRotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False)
        self.rotary = Rotary()


def expected_cache() -> torch.Tensor:
    return Rotary().cos_sin_cache


def test_a_meta_buffer_nothing_writes_is_refused_naming_it_and_the_fix(tmp_path):
    path = write(tmp_path, {"proj.weight": torch.ones(8, 8)})
    with torch.device("meta"):
        model = WithRotary()
    plan = plan_checkpoint(model, path)
    assert plan.report.problem_kinds == ["no_values"]
    assert "'rotary.cos_sin_cache'" in plan.report.problems[0]
    with pytest.raises(LoadPlanError, match=r"rotary.cos_sin_cache.*init_empty_weights"):
        load_checkpoint(model, path, device="cpu")
    with pytest.raises(LoadPlanError, match="rotary.cos_sin_cache"):  # the seed's door refuses it too
        load_model(model, SimpleNamespace(model=str(path)))
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))


def test_init_empty_weights_keeps_buffers_and_both_doors_load(tmp_path):
    path = write(tmp_path, {"proj.weight": torch.full((8, 8), 3.0)})
    for door in ("load_checkpoint", "load_model"):
        with init_empty_weights():
            model = WithRotary()
        assert model.proj.weight.is_meta and not model.rotary.cos_sin_cache.is_meta
        if door == "load_checkpoint":
            load_checkpoint(model, path, device="cpu")
        else:
            load_model(model, SimpleNamespace(model=str(path)))
        assert torch.equal(model.rotary.cos_sin_cache, expected_cache())
        assert torch.equal(model.proj.weight, torch.full((8, 8), 3.0))


def test_a_failed_load_gives_back_the_exact_tensors_of_an_empty_weights_model(tmp_path):
    with init_empty_weights():
        model = WithRotary()
    cache, weight = model.rotary.cos_sin_cache, model.proj.weight
    with pytest.raises(LoadPlanError):
        load_checkpoint(model, write(tmp_path, {"proj.weight": torch.ones(8, 8), "stray": torch.ones(1)}), device="cpu")
    assert model.rotary.cos_sin_cache is cache and model.proj.weight is weight
    load_checkpoint(model, write(tmp_path / "good", {"proj.weight": torch.ones(8, 8)}), device="cpu")
    assert torch.equal(model.rotary.cos_sin_cache, expected_cache())


def test_init_empty_weights_keeps_ties_attributes_and_declared_rebuilt_buffers(tmp_path):
    class Tied(WithRotary):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 8, bias=False)
            self.head.weight = self.proj.weight
            self.proj.weight.weight_loader = lambda p, t: p.data.copy_(t)

    with init_empty_weights():
        model = Tied()
    assert model.head.weight is model.proj.weight and model.proj.weight.is_meta
    assert callable(model.proj.weight.weight_loader)
    with init_empty_weights(include_buffers=True):
        everything = WithRotary()
    assert everything.rotary.cos_sin_cache.is_meta

    class Rebuilt(Rotary):  # a module that recomputes its cache when moved may say so
        diffulex_rebuilt_buffers = ("cos_sin_cache",)

    with torch.device("meta"):
        model = WithRotary()
        model.rotary = Rebuilt()
    assert plan_checkpoint(model, write(tmp_path, {"proj.weight": torch.ones(8, 8)})).report.ok


def test_bundled_families_built_by_our_tools_keep_their_rotary_cache():
    from diffulex_dream.model import build_dream

    with init_empty_weights():
        model = build_dream({})
    caches = [b for n, b in model.named_buffers() if n.endswith("cos_sin_cache")]
    assert caches and all(not c.is_meta and c.abs().sum() > 0 for c in caches)


# --------------------------------------------------------------------------- two tensors, one destination (item 14)


class Scalar(nn.Module):
    """Shaped like DiffusionGemma's layer_scalar: encoder and decoder tensors resolve to one buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("layer_scalar", torch.zeros(1))
        self.proj = nn.Linear(2, 2, bias=False)

    def resolve_checkpoint_weight(self, name, ctx):
        if name.endswith(".layer_scalar"):
            return ResolvedWeight(buffer="layer_scalar")
        return None


def scalar_checkpoint(tmp_path: Path, encoder: float, decoder: float) -> Path:
    return write(tmp_path, {"model.encoder.layer_scalar": torch.tensor([encoder]),
                            "model.decoder.layer_scalar": torch.tensor([decoder]), "proj.weight": torch.ones(2, 2)})


def test_byte_identical_tensors_for_one_destination_load_as_aliases(tmp_path):
    model = Scalar()
    report = load_checkpoint(model, scalar_checkpoint(tmp_path, 0.5, 0.5))
    assert report.ok and model.layer_scalar.item() == 0.5
    notes = {p.name: p.note for p in report.placements}
    assert "alias of 'model.decoder.layer_scalar'" in notes["model.encoder.layer_scalar"]
    assert report.bytes_read == report.bytes_total - 4  # the alias was compared, not written twice


def test_different_tensors_for_one_destination(tmp_path):
    path = scalar_checkpoint(tmp_path, 0.25, 0.75)
    model = Scalar()
    proj = model.proj.weight.detach().clone()
    with pytest.raises(LoadPlanError, match=r"(?=.*'model.decoder.layer_scalar')(?=.*'model.encoder.layer_scalar')"
                                            r".*different values"):
        load_checkpoint(model, path)
    assert model.layer_scalar.item() == 0.0 and torch.equal(model.proj.weight, proj)  # untouched
    with pytest.warns(LoadWarning, match=r"(?=.*'model.decoder.layer_scalar')(?=.*'model.encoder.layer_scalar')"):
        load_model(model, SimpleNamespace(model=str(path)))
    # the last in Diffulex's reading order wins: within a file safetensors lists names sorted
    assert model.layer_scalar.item() == 0.25  # the encoder's
    skipped = model.diffulex_load_report.skipped
    assert "overridden by 'model.encoder.layer_scalar'" in skipped["model.decoder.layer_scalar"]

"""Bad checkpoints on real files: every one is refused with a typed error that names the file
(and the tensor, where there is one), and a refused load leaves the model byte-for-byte as it was.

Checkpoints are written with ``safetensors.torch.save_file`` into ``tmp_path`` and then damaged
with plain file operations. The model is filled with recognisable values and the checkpoint is
written from a different random state, so any partial write would show.
"""

from __future__ import annotations

import json
import resource
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffulex_core.errors import CheckpointFormatError, CheckpointNotFoundError, LoadError, LoadPlanError
from diffulex_core.loader import load_checkpoint, plan_checkpoint

INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


# --------------------------------------------------------------------------- the test model


class TinyNet(nn.Module):
    """Two Linear layers, a persistent buffer (in the checkpoint) and a non-persistent one (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.register_buffer("scale", torch.zeros(3))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def make_model() -> TinyNet:
    """A TinyNet whose every parameter and buffer holds distinctive non-zero values."""
    model = TinyNet()
    with torch.no_grad():
        for k, (_, t) in enumerate([*model.named_parameters(), *model.named_buffers()]):
            t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) * 0.25 + 100.0 * (k + 1))
    return model


def ckpt_tensors(seed: int = 1234) -> dict[str, torch.Tensor]:
    """The checkpoint contents: the model's persistent state, from a different random state."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=gen, dtype=t.dtype)
            for name, t in make_model().state_dict().items()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters/named_buffers rather than state_dict, so non-persistent buffers count too
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not (after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]))]
    assert not changed, f"a failed load modified {changed}"


def expect_failure(path, exc_type, *fragments, model=None, **kwargs) -> LoadError:
    """Load ``path``; assert the exact error type, every fragment in the message, model unchanged."""
    model = model if model is not None else make_model()
    before = snapshot(model)
    with pytest.raises(LoadError) as info:
        load_checkpoint(model, path, **kwargs)
    assert type(info.value) is exc_type, f"expected {exc_type.__name__}, got {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in message:\n{message}"
    assert_unchanged(model, before)
    return info.value


# --------------------------------------------------------------------------- writing checkpoints


def write_single(directory: Path, tensors: dict[str, torch.Tensor] | None = None,
                 name: str = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / name
    save_file(tensors if tensors is not None else ckpt_tensors(), str(file))
    return file


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor] | None = None,
                  index_overrides: dict[str, str] | None = None) -> dict[str, str]:
    """fc1.* in shard 1, everything else in shard 2; returns the weight map written to the index."""
    tensors = tensors if tensors is not None else ckpt_tensors()
    directory.mkdir(parents=True, exist_ok=True)
    shards = {SHARD1: {k: v for k, v in tensors.items() if k.startswith("fc1.")},
              SHARD2: {k: v for k, v in tensors.items() if not k.startswith("fc1.")}}
    weight_map = {}
    for file, part in shards.items():
        save_file(part, str(directory / file))
        weight_map.update({k: file for k in part})
    weight_map.update(index_overrides or {})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return weight_map


def header_of(file: Path) -> tuple[int, dict]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + length, json.loads(raw[8:8 + length])


def last_tensor(file: Path) -> tuple[str, int, int]:
    """(name, absolute start, absolute end) of the tensor stored last in the file."""
    data_start, header = header_of(file)
    name, info = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][1])
    begin, end = info["data_offsets"]
    return name, data_start + begin, data_start + end


def assert_loaded(model: nn.Module, tensors: dict[str, torch.Tensor], names) -> None:
    state = model.state_dict()
    for name in names:
        assert torch.equal(state[name], tensors[name]), f"{name} was not loaded from the checkpoint"


# --------------------------------------------------------------------------- sanity: the good case


def test_intact_checkpoint_loads_every_tensor(tmp_path):
    """The fixtures themselves are sound: an undamaged file loads completely."""
    tensors = ckpt_tensors()
    write_single(tmp_path, tensors)
    model = make_model()
    scratch = model.scratch.clone()
    report = load_checkpoint(model, tmp_path)
    assert report.ok and report.applied and not report.missing and not report.unexpected
    assert_loaded(model, tensors, tensors)
    assert torch.equal(model.scratch, scratch)  # non-persistent buffer: not in the checkpoint, untouched


# --------------------------------------------------------------------------- 1. truncated file


@pytest.mark.parametrize("strict", [True, False])
def test_truncated_file_names_file_and_cut_tensor(tmp_path, strict):
    file = write_single(tmp_path)
    name, _, end = last_tensor(file)
    assert end == file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(end - 3)  # cut the last 3 bytes: only the last tensor's data is short
    expect_failure(file, CheckpointFormatError, file.name, repr(name), "truncated", strict=strict)


def test_truncated_deeper_names_a_cut_tensor_not_an_intact_one(tmp_path):
    file = write_single(tmp_path)
    data_start, header = header_of(file)
    name, start, end = last_tensor(file)
    with open(file, "r+b") as f:
        f.truncate(start - 2)  # the last tensor is gone, the one before it is short
    cut = {k for k, v in header.items() if k != "__metadata__" and data_start + v["data_offsets"][1] > start - 2}
    assert len(cut) == 2
    error = expect_failure(tmp_path, CheckpointFormatError, file.name, "truncated")
    assert any(repr(k) in str(error) for k in cut), str(error)
    intact = set(header) - cut - {"__metadata__"}
    assert not any(repr(k) in str(error) for k in intact), str(error)


def test_file_truncated_inside_its_header(tmp_path):
    file = write_single(tmp_path)
    data_start, _ = header_of(file)
    with open(file, "r+b") as f:
        f.truncate(data_start - 10)
    expect_failure(tmp_path, CheckpointFormatError, file.name, "past the end of the file")


def test_file_shorter_than_the_length_field(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00")
    expect_failure(tmp_path, CheckpointFormatError, file.name, "too short")


# --------------------------------------------------------------------------- 2.-4. bad header framing


def test_header_length_past_end_of_file(tmp_path):
    file = write_single(tmp_path)
    size = file.stat().st_size
    raw = bytearray(file.read_bytes())
    raw[:8] = struct.pack("<Q", size)  # 8 + size > size
    file.write_bytes(bytes(raw))
    expect_failure(tmp_path, CheckpointFormatError, file.name, "runs past the end of the file", f"{size:,}")


@pytest.mark.parametrize("strict", [True, False])
def test_header_not_valid_json(tmp_path, strict):
    file = write_single(tmp_path)
    data_start, _ = header_of(file)
    raw = bytearray(file.read_bytes())
    raw[8:16] = b'{"fc1.w\x00'  # same length, so the framing is intact but the JSON is not
    file.write_bytes(bytes(raw))
    expect_failure(file, CheckpointFormatError, file.name, "not valid JSON", strict=strict)


def test_header_json_but_not_an_object(tmp_path):
    file = tmp_path / "model.safetensors"
    body = b'[1, 2, 3]       '
    file.write_bytes(struct.pack("<Q", len(body)) + body)
    expect_failure(tmp_path, CheckpointFormatError, file.name, "not an object")


def test_header_entry_malformed_names_tensor(tmp_path):
    file = tmp_path / "model.safetensors"
    body = json.dumps({"fc1.weight": {"dtype": "F32", "shape": [6, 4]}}).encode()  # no data_offsets
    file.write_bytes(struct.pack("<Q", len(body)) + body)
    expect_failure(tmp_path, CheckpointFormatError, file.name, "'fc1.weight'", "malformed")


def test_header_entry_with_wrong_byte_span_names_tensor(tmp_path):
    file = tmp_path / "model.safetensors"
    body = json.dumps({"fc1.weight": {"dtype": "F32", "shape": [6, 4], "data_offsets": [0, 95]}}).encode()
    file.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 95)
    expect_failure(tmp_path, CheckpointFormatError, file.name, "'fc1.weight'", "expected 96 bytes")


@pytest.mark.parametrize("length", [100_000_001, 2**63 + 12345, 2**64 - 1])
def test_header_length_over_100_mb(tmp_path, length):
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", length) + b'{"junk": 1}' + b"\xff" * 64)
    expect_failure(tmp_path, CheckpointFormatError, file.name, "100 MB")


# --------------------------------------------------------------------------- 5. Git LFS pointer


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 123\n"
)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("target", ["directory", "file"])
def test_git_lfs_pointer_instead_of_weights(tmp_path, target, strict):
    file = tmp_path / "model.safetensors"
    file.write_text(LFS_POINTER)
    expect_failure(tmp_path if target == "directory" else file, CheckpointFormatError,
                   file.name, "Git LFS", "git lfs pull", strict=strict)


def test_git_lfs_pointer_as_one_shard(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / SHARD2).write_text(LFS_POINTER)
    error = expect_failure(tmp_path, CheckpointFormatError, SHARD2, "Git LFS", "git lfs pull")
    assert SHARD1 not in str(error)


# --------------------------------------------------------------------------- 6.-8. sharded / multi-file layouts


def test_index_names_missing_file(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / SHARD2).unlink()
    expect_failure(tmp_path, CheckpointFormatError, INDEX, SHARD2, "does not exist")


def test_index_swaps_the_files_of_two_tensors(tmp_path):
    """Both files exist and are read; the index names the wrong one for a tensor."""
    write_sharded(tmp_path, index_overrides={"fc1.weight": SHARD2})
    expect_failure(tmp_path, CheckpointFormatError, "'fc1.weight'", SHARD1, repr(SHARD2))


def test_index_puts_tensor_in_a_shard_that_lacks_it(tmp_path):
    """The index sends every fc1 tensor to shard 2, so shard 1 is never read and they are absent."""
    write_sharded(tmp_path, index_overrides={"fc1.weight": SHARD2, "fc1.bias": SHARD2})
    error = expect_failure(tmp_path, CheckpointFormatError, SHARD2, "lack")
    assert "'fc1.bias'" in str(error) or "'fc1.weight'" in str(error)


def test_index_names_tensor_no_file_holds(tmp_path):
    write_sharded(tmp_path, index_overrides={"fc3.weight": SHARD1})
    expect_failure(tmp_path, CheckpointFormatError, "'fc3.weight'", SHARD1)


def test_index_omits_a_tensor_a_file_holds(tmp_path):
    write_sharded(tmp_path)
    index = json.loads((tmp_path / INDEX).read_text())
    del index["weight_map"]["fc1.bias"]
    (tmp_path / INDEX).write_text(json.dumps(index))
    expect_failure(tmp_path, CheckpointFormatError, "'fc1.bias'", SHARD1, "no file")


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": {"fc1.weight": 3}}'])
def test_malformed_index(tmp_path, content):
    write_sharded(tmp_path)
    (tmp_path / INDEX).write_text(content)
    expect_failure(tmp_path, CheckpointFormatError, INDEX)


@pytest.mark.parametrize("strict", [True, False])
def test_same_tensor_in_two_files_without_index(tmp_path, strict):
    tensors = ckpt_tensors()
    write_single(tmp_path, tensors, name="a.safetensors")
    write_single(tmp_path, {"fc2.bias": ckpt_tensors(seed=99)["fc2.bias"]}, name="b.safetensors")
    expect_failure(tmp_path, CheckpointFormatError, "'fc2.bias'", "a.safetensors", "b.safetensors", strict=strict)


def test_two_indexes_in_one_directory(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / "other.safetensors.index.json").write_text((tmp_path / INDEX).read_text())
    expect_failure(tmp_path, CheckpointFormatError, INDEX, "other.safetensors.index.json")


# --------------------------------------------------------------------------- 9.-10. plan problems: shape and dtype


def test_shape_mismatch_strict(tmp_path):
    tensors = ckpt_tensors()
    tensors["fc1.weight"] = tensors["fc1.weight"].t().contiguous()  # [4, 6] for a [6, 4] parameter
    file = write_single(tmp_path, tensors)
    error = expect_failure(tmp_path, LoadPlanError, "'fc1.weight'", file.name, "[4, 6]", "[6, 4]", "param")
    assert error.report.problems and not error.report.applied
    rejected = [p for p in error.report.placements if p.kind == "rejected"]
    assert [(p.name, p.target) for p in rejected] == [("fc1.weight", "fc1.weight")]


def test_shape_mismatch_not_strict_loads_the_rest(tmp_path):
    tensors = ckpt_tensors()
    tensors["fc1.weight"] = tensors["fc1.weight"].t().contiguous()
    write_single(tmp_path, tensors)
    model = make_model()
    before = snapshot(model)
    report = load_checkpoint(model, tmp_path, strict=False)
    assert report.applied and not report.ok
    assert any("'fc1.weight'" in p and "[4, 6]" in p and "[6, 4]" in p for p in report.problems), report.problems
    assert torch.equal(model.fc1.weight, before["fc1.weight"])  # kept its old value
    assert_loaded(model, tensors, [k for k in tensors if k != "fc1.weight"])
    assert torch.equal(model.scratch, before["scratch"])


def test_shape_mismatch_of_buffer(tmp_path):
    tensors = ckpt_tensors()
    tensors["scale"] = torch.ones(5)
    expect_failure(write_single(tmp_path, tensors), LoadPlanError, "'scale'", "buffer", "[5]", "[3]")


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32, torch.bool])
def test_dtype_that_cannot_be_cast(tmp_path, bad_dtype):
    tensors = ckpt_tensors()
    tensors["fc2.weight"] = (tensors["fc2.weight"] * 10).to(bad_dtype)
    file = write_single(tmp_path, tensors)
    expect_failure(tmp_path, LoadPlanError, "'fc2.weight'", file.name, str(bad_dtype), "torch.float32")


def test_dtype_that_can_be_cast_loads(tmp_path):
    """Float-to-float casts are allowed (bf16 -> f32), so the refusal above is specific."""
    tensors = ckpt_tensors()
    tensors["fc2.weight"] = tensors["fc2.weight"].to(torch.bfloat16)
    write_single(tmp_path, tensors)
    model = make_model()
    assert load_checkpoint(model, tmp_path).ok
    assert torch.equal(model.fc2.weight, tensors["fc2.weight"].float())


def test_every_plan_problem_is_reported_at_once(tmp_path):
    tensors = ckpt_tensors()
    tensors["fc1.weight"] = tensors["fc1.weight"].t().contiguous()
    tensors["fc2.weight"] = tensors["fc2.weight"].long()
    tensors["extra.weight"] = torch.ones(2)
    del tensors["fc2.bias"]
    error = expect_failure(write_single(tmp_path, tensors), LoadPlanError,
                           "'fc1.weight'", "'fc2.weight'", "'extra.weight'", "fc2.bias", "missing", "nothing was "
                                                                                                    "loaded")
    # a rejected tensor's parameter is also reported missing (it is indeed left unwritten)
    assert error.report.unexpected == ["extra.weight"]
    assert sorted(p.name for p in error.report.placements if p.kind == "rejected") == ["fc1.weight", "fc2.weight"]
    assert "fc2.bias" in error.report.missing


# --------------------------------------------------------------------------- 11. nothing there


def test_empty_directory(tmp_path):
    expect_failure(tmp_path, CheckpointNotFoundError, str(tmp_path), "no .safetensors")


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    expect_failure(tmp_path, CheckpointNotFoundError, str(tmp_path), "no .safetensors")


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    error = expect_failure(missing, CheckpointNotFoundError, str(missing), "does not exist")
    assert isinstance(error, FileNotFoundError)


# --------------------------------------------------------------------------- 12. index escaping its directory


def test_index_entry_outside_checkpoint_directory(tmp_path):
    root = tmp_path / "ckpt"
    write_sharded(root, index_overrides={"fc2.bias": "../outside.safetensors"})
    write_single(tmp_path, {"fc2.bias": ckpt_tensors()["fc2.bias"]}, name="outside.safetensors")
    assert (root / "../outside.safetensors").is_file()
    expect_failure(root, CheckpointFormatError, INDEX, "'../outside.safetensors'", "outside the checkpoint directory")


def test_index_entry_absolute_path(tmp_path):
    root = tmp_path / "ckpt"
    outside = write_single(tmp_path, {"fc2.bias": ckpt_tensors()["fc2.bias"]}, name="outside.safetensors")
    write_sharded(root, index_overrides={"fc2.bias": str(outside)})
    expect_failure(root, CheckpointFormatError, INDEX, "outside the checkpoint directory")


@pytest.mark.parametrize("name", ["model\x00.safetensors", "\x00", "sub/\x00/model.safetensors"])
def test_index_entry_with_a_nul_byte_names_the_index(tmp_path, name):
    """No OS path holds a NUL byte: os.stat would raise a bare ValueError ("embedded null byte")."""
    write_sharded(tmp_path, index_overrides={"fc2.bias": name})
    expect_failure(tmp_path, CheckpointFormatError, INDEX, "NUL byte", "'fc2.bias'")


def test_checkpoint_path_with_a_nul_byte_is_a_typed_error(tmp_path):
    write_single(tmp_path)
    expect_failure(f"{tmp_path}/model\x00.safetensors", CheckpointNotFoundError, "NUL byte")


def test_index_shards_symlinked_like_the_hf_cache_load(tmp_path):
    """A legitimate layout: snapshots/<rev>/<shard> -> ../../blobs/<sha>, as huggingface_hub writes it."""
    tensors = ckpt_tensors()
    staging = tmp_path / "staging"
    write_sharded(staging, tensors)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, name in enumerate([SHARD1, SHARD2, INDEX]):
        (staging / name).rename(blobs / f"blob{i}")
        (snap / name).symlink_to(f"../../blobs/blob{i}")
    model = make_model()
    report = load_checkpoint(model, snap)
    assert report.ok
    assert_loaded(model, tensors, tensors)


def test_index_shards_symlinked_inside_the_directory_load(tmp_path):
    tensors = ckpt_tensors()
    write_sharded(tmp_path, tensors)
    for i, name in enumerate([SHARD1, SHARD2]):
        (tmp_path / name).rename(tmp_path / f".blob{i}")
        (tmp_path / name).symlink_to(f".blob{i}")
    model = make_model()
    report = load_checkpoint(model, tmp_path)
    assert report.ok
    assert_loaded(model, tensors, tensors)


# --------------------------------------------------------------------------- 13. pickles


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.00.pth"])
def test_directory_with_only_pickles_is_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x02any pickle bytes, never unpickled")
    (tmp_path / "config.json").write_text("{}")
    expect_failure(tmp_path, CheckpointNotFoundError, name, "never loads pickles")


def test_path_to_pickle_file_is_refused(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    file.write_bytes(b"\x80\x02any pickle bytes, never unpickled")
    expect_failure(file, CheckpointFormatError, file.name, "never loads pickles")


def test_index_naming_a_pickle_is_refused(tmp_path):
    write_sharded(tmp_path, index_overrides={"fc2.bias": "pytorch_model.bin"})
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02any pickle bytes")
    expect_failure(tmp_path, CheckpointFormatError, "pytorch_model.bin", "never loads pickles")


def test_path_to_other_file_is_refused(tmp_path):
    file = tmp_path / "weights.npz"
    file.write_bytes(b"PK\x03\x04")
    expect_failure(file, CheckpointFormatError, file.name, "not a .safetensors file")


# --------------------------------------------------------------------------- 14. stray file beside an index


def test_stray_file_beside_index_is_ignored_and_noted(tmp_path):
    tensors = ckpt_tensors()
    write_sharded(tmp_path, tensors)
    # same tensor names, other values: reading it would be a duplicate or load the wrong values
    write_single(tmp_path, ckpt_tensors(seed=7), name="consolidated.safetensors")
    model = make_model()
    report = load_checkpoint(model, tmp_path)
    assert report.ok and report.applied
    assert sorted(Path(f).name for f in report.files) == [SHARD1, SHARD2]
    assert {p.file for p in report.placements} == {SHARD1, SHARD2}
    assert any("consolidated.safetensors" in note and "ignored" in note for note in report.notes), report.notes
    assert_loaded(model, tensors, tensors)


def test_corrupt_stray_file_beside_index_is_not_even_opened(tmp_path):
    tensors = ckpt_tensors()
    write_sharded(tmp_path, tensors)
    (tmp_path / "consolidated.safetensors").write_text(LFS_POINTER)
    model = make_model()
    report = load_checkpoint(model, tmp_path)
    assert report.ok
    assert any("consolidated.safetensors" in note for note in report.notes), report.notes
    assert_loaded(model, tensors, tensors)


# --------------------------------------------------------------------------- 15. unexpected and missing


def test_unexpected_tensor_strict(tmp_path):
    tensors = ckpt_tensors()
    tensors["lm_head.weight"] = torch.ones(3, 6)
    file = write_single(tmp_path, tensors)
    error = expect_failure(tmp_path, LoadPlanError, "'lm_head.weight'", file.name, "unexpected")
    assert error.report.unexpected == ["lm_head.weight"]


def test_missing_parameter_strict(tmp_path):
    tensors = ckpt_tensors()
    del tensors["fc2.bias"]
    error = expect_failure(write_single(tmp_path, tensors), LoadPlanError, "fc2.bias", "missing")
    assert error.report.missing == ["fc2.bias"]


def test_missing_buffer_strict(tmp_path):
    tensors = ckpt_tensors()
    del tensors["scale"]
    error = expect_failure(write_single(tmp_path, tensors), LoadPlanError, "scale", "missing")
    assert error.report.missing == ["scale"]  # the non-persistent buffer is never expected


def test_unexpected_and_missing_not_strict_loads_the_rest(tmp_path):
    tensors = ckpt_tensors()
    del tensors["fc2.bias"]
    tensors["lm_head.weight"] = torch.ones(3, 6)
    write_single(tmp_path, tensors)
    model = make_model()
    before = snapshot(model)
    report = load_checkpoint(model, tmp_path, strict=False)
    assert report.applied and not report.ok
    assert report.unexpected == ["lm_head.weight"]
    assert report.missing == ["fc2.bias"]
    assert torch.equal(model.fc2.bias, before["fc2.bias"])
    assert_loaded(model, tensors, ["fc1.weight", "fc1.bias", "fc2.weight", "scale"])
    assert torch.equal(model.scratch, before["scratch"])


# --------------------------------------------------------------------------- 16. the plan reads headers only


def _rchar() -> int | None:
    """Bytes this process has passed through read-like syscalls (Linux /proc/self/io)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def test_plan_succeeds_on_garbage_data_with_intact_header(tmp_path):
    file = write_single(tmp_path)
    data_start, _ = header_of(file)
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(data_start)
        f.write(b"\xde\xad\xbe\xef" * ((size - data_start) // 4) + b"\xff" * ((size - data_start) % 4))
    assert file.stat().st_size == size
    model = make_model()
    before = snapshot(model)
    plan = plan_checkpoint(model, tmp_path)
    assert plan.report.ok and not plan.report.applied and plan.report.bytes_read == 0
    assert_unchanged(model, before)


def test_plan_of_3_gib_sparse_file_reads_no_tensor_data(tmp_path):
    rows, cols = 49152, 16384  # float32: exactly 3 GiB
    nbytes = rows * cols * 4
    assert nbytes == 3 * 1024**3
    body = json.dumps({"__metadata__": {"format": "pt"},
                       "huge.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, nbytes]}}).encode()
    body += b" " * (-len(body) % 8)
    file = tmp_path / "model.safetensors"
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + nbytes)  # sparse: the 3 GiB of data are never written
    assert file.stat().st_size == 8 + len(body) + nbytes
    if file.stat().st_blocks * 512 > 64 * 1024**2:
        pytest.skip("this filesystem does not make sparse files")

    class Huge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.huge = nn.Linear(cols, rows, bias=False)

    with torch.device("meta"):
        model = Huge()
    assert model.huge.weight.is_meta and tuple(model.huge.weight.shape) == (rows, cols)

    small = make_model()  # warm-up: plugin discovery and imports happen on the first plan, not in the measurement
    write_single(tmp_path / "warm", ckpt_tensors())
    assert plan_checkpoint(small, tmp_path / "warm").report.ok

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rchar_before = _rchar()
    started = time.perf_counter()
    plan = plan_checkpoint(model, tmp_path)
    elapsed = time.perf_counter() - started
    rchar_after = _rchar()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024

    assert plan.report.ok, plan.report.problems
    assert plan.report.bytes_total == nbytes and plan.report.bytes_read == 0 and not plan.report.applied
    assert [(p.name, p.kind, p.target) for p in plan.report.placements] == [("huge.weight", "param", "huge.weight")]
    assert elapsed < 0.5, f"planning took {elapsed:.3f} s"
    assert rss_growth < 256 * 1024**2, f"peak RSS grew by {rss_growth / 1024**2:.0f} MiB"
    if rchar_before is not None and rchar_after is not None:
        # the header (a few hundred bytes) plus slack; any tensor data would be gigabytes
        assert rchar_after - rchar_before < 1024**2, f"read {rchar_after - rchar_before:,} bytes while planning"
    assert model.huge.weight.is_meta  # the plan materialized nothing

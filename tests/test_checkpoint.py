"""Checkpoints: atomic saves, loads that refuse pickled code, and wrapper-prefix unwrapping."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from xdt_cli.checkpoint import FORMAT, load_checkpoint, save_checkpoint, unwrap_state_dict
from xdt_cli.errors import CheckpointError


class SomeClass:
    """A plain custom object: harmless, but not plain data."""

    def __init__(self) -> None:
        self.value = 3


class Touch:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def refusal(path: Path) -> str:
    """The single error line that loading `path` raises."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    (line,) = info.value.lines
    assert line.startswith(f"{path}: "), line
    return line


def sample_state() -> dict:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.rand(4, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.Random(5).getstate()},
        "step": 1234,
        "lr": 0.0125,
        "name": "tiny",
        "flags": [True, None, 2, 2.5, "x"],
        "nested": {"a": {"b": torch.arange(6).reshape(2, 3), "c": (1, 2)}},
        "dtypes": {
            "half": torch.tensor([1.5, -2.0], dtype=torch.float16),
            "bool": torch.tensor([True, False]),
            "int8": torch.tensor([-3, 7], dtype=torch.int8),
        },
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and a.shape == b.shape and b.device.type == "cpu"
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


# --------------------------------------------------------------------------- round trip
def test_save_then_load_round_trips_tensors_numbers_and_nested_dicts(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "last.pt"  # missing folders are created
    state = sample_state()
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT == 1
    assert_same(state, {k: v for k, v in loaded.items() if k != "format"})
    # what was saved is usable: the restored optimizer and RNG behave like the originals
    restored = random.Random()
    restored.setstate(loaded["rng"]["python"])
    assert restored.random() == random.Random(5).random()
    model = nn.Linear(3, 2)
    model.load_state_dict(loaded["model"])
    torch.optim.Adam(model.parameters()).load_state_dict(loaded["optimizer"])


def test_saving_again_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"format": FORMAT, "step": 2}
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_previous_file_intact_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()
    real_save = torch.save

    def half_written(obj, fh, *args, **kwargs):
        real_save({"format": FORMAT, "step": 999}, fh)  # a complete, different file...
        fh.write(b"\x00" * 100)  # ...and some garbage, then the crash
        raise error

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(type(error)):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()

    assert path.read_bytes() == before
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_failed_first_save_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "best.pt", {"step": 1})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- refusals
def test_a_pickled_custom_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"format": FORMAT, "x": SomeClass()}, path)
    assert torch.load(path, weights_only=False)["x"].value == 3  # a loadable torch file
    assert "refused" in refusal(path)


def test_the_refusal_message_is_plain_text_naming_the_object(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"format": FORMAT, "x": SomeClass()}, path)
    line = refusal(path)
    assert line.isprintable(), repr(line)
    assert "SomeClass" in line


@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save", "raw-pickle"])
def test_a_malicious_pickle_is_refused_and_never_run(tmp_path: Path, legacy: bool) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Touch(control)))  # the payload is live when unpickled
    assert control.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "x": Touch(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    refusal(path)
    assert not marker.exists()


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    refusal(path)


@pytest.mark.parametrize("cut", [0, 10, 0.5])
def test_a_truncated_or_empty_file_is_refused(tmp_path: Path, cut: float) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.arange(1000.0)})
    data = good.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    refusal(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    assert "not found" in refusal(tmp_path / "missing.pt")
    assert "not found" in refusal(tmp_path)  # a folder is not a checkpoint


@pytest.mark.parametrize(
    "content",
    [{"step": 1}, {"format": 2, "step": 1}, {"format": "1"}, [1, 2], torch.ones(2)],
    ids=["no-format", "format-2", "format-str", "list", "tensor"],
)
def test_a_torch_file_that_is_not_an_xdt_checkpoint_is_refused(tmp_path: Path, content) -> None:
    path = tmp_path / "other.pt"
    torch.save(content, path)
    assert "not an xdt checkpoint" in refusal(path)


# --------------------------------------------------------------------------- unwrapping
def test_unwrap_state_dict_strips_wrapper_components() -> None:
    w, b, c, d, e = (object() for _ in range(5))
    out = unwrap_state_dict(
        {
            "model.module.features.0.weight": w,
            "_orig_mod.head.bias": b,
            "module._orig_mod.features.3.weight": c,
            "modules.x": d,  # only whole components named module / _orig_mod go
            "my_module.mod.y": e,
        }
    )
    assert list(out) == [
        "model.features.0.weight",
        "head.bias",
        "features.3.weight",
        "modules.x",
        "my_module.mod.y",
    ]
    assert out["model.features.0.weight"] is w and out["features.3.weight"] is c


def test_unwrapped_state_dicts_of_compiled_and_wrapped_models_load_into_plain_ones() -> None:
    class Wrapper(nn.Module):  # what DistributedDataParallel looks like to state_dict()
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    wrapped = Wrapper(torch.compile(inner))
    keys = list(wrapped.state_dict())
    assert keys[0] == "module._orig_mod.0.weight"
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    plain.load_state_dict(unwrap_state_dict(wrapped.state_dict()))  # strict
    assert torch.equal(plain[0].weight, inner[0].weight)


# --------------------------------------------------------------------------- damage
def _flip_a_byte_of(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside the stored bytes of `tensor` (torch.save stores them as is)."""
    raw = path.read_bytes()
    where = raw.find(tensor.numpy().tobytes())
    assert where > 0, "the tensor's bytes are not stored verbatim"
    damaged = bytearray(raw)
    damaged[where + 401] ^= 0x04
    path.write_bytes(bytes(damaged))


def test_a_flipped_bit_in_a_tensor_is_detected_by_the_checksum(tmp_path: Path) -> None:
    weights = torch.arange(1000.0)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 3, "w": weights})
    _flip_a_byte_of(path, weights)
    # torch itself loads the altered file without complaint: only the checksum sees it
    assert not torch.equal(torch.load(path, weights_only=True)["w"], weights)
    line = refusal(path)
    assert "damaged" in line and "checksum" in line


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_a_truncated_checkpoint_is_refused_with_one_line(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"step": 3, "w": torch.arange(1000.0)})
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    refusal(path)


def test_the_checksum_covers_plain_values_and_survives_a_round_trip(tmp_path: Path) -> None:
    from xdt_cli.checkpoint import content_digest

    state = {"format": FORMAT, "step": 3, "best": {"value": 0.5, "metrics": {"a": 1.0}}}
    again = {"format": FORMAT, "step": 3, "best": {"value": 0.5, "metrics": {"a": 1.0}}}
    other = {"format": FORMAT, "step": 3, "best": {"value": 0.25, "metrics": {"a": 1.0}}}
    assert content_digest(state) == content_digest(again) != content_digest(other)
    assert content_digest({"s": [1, 2]}) != content_digest({"s": (1, 2)})
    assert content_digest({"w": torch.zeros(2)}) != content_digest({"w": torch.zeros(2, 1)})
    assert content_digest({"w": torch.zeros(2)}) != content_digest({"w": torch.zeros(2).half()})
    save_checkpoint(tmp_path / "c.pt", {"step": 3, "best": state["best"], "t": (1, "x")})
    assert load_checkpoint(tmp_path / "c.pt")["best"] == state["best"]


def test_keep_previous_leaves_the_replaced_checkpoint_as_prev(tmp_path: Path) -> None:
    from xdt_cli.checkpoint import previous_path, resume_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 10, "w": torch.arange(1000.0)}, keep_previous=True)
    assert not previous_path(path).exists()
    save_checkpoint(path, {"step": 20, "w": torch.arange(1000.0) + 1}, keep_previous=True)
    assert previous_path(path) == tmp_path / "last.prev.pt"
    assert load_checkpoint(previous_path(path))["step"] == 10
    state, note = resume_checkpoint(path)
    assert state["step"] == 20 and note is None
    _flip_a_byte_of(path, torch.arange(1000.0) + 1)
    state, note = resume_checkpoint(path)
    assert state["step"] == 10
    assert note is not None and note.startswith("last.pt is unusable (damaged")
    assert note.endswith("resuming from last.prev.pt")
    path.unlink()  # a crash between the two renames leaves only last.prev.pt
    assert resume_checkpoint(path)[0]["step"] == 10
    previous_path(path).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="last.pt: checkpoint not found; last.prev.pt is"):
        resume_checkpoint(path)

"""Every bad checkpoint gives the module's own error, naming the file and what to do."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lungseg_utils as L
from conftest import naming


class RunsCode:
    """Pickles to a call of os.system: what a hostile 'checkpoint' would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


def test_good_checkpoint_loads_and_stores_versions(tiny_checkpoint):
    model = L.load_checkpoint(tiny_checkpoint)
    assert model.lungseg_config["encoder"] == "resnet18" and model.lungseg_checkpoint == tiny_checkpoint
    versions = L.read_checkpoint(tiny_checkpoint)["versions"]
    assert versions["torch"] == torch.__version__ and type(versions["torch"]) is str


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    cut = tmp_path / "cut.pt"
    data = tiny_checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(L.LungsegCheckpointError, match=naming(cut, "truncated")):
        L.load_checkpoint(cut)


def test_text_file(tmp_path):
    (tmp_path / "notes.pt").write_text("epoch 12: val loss 0.1\n")
    with pytest.raises(L.LungsegCheckpointError, match=naming("notes.pt", "not a PyTorch checkpoint")):
        L.load_checkpoint(tmp_path / "notes.pt")


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = write_payload(tmp_path / "evil.pt", {"model_state": {}, "config": {"encoder": "resnet18", "image_size": 64}, "x": RunsCode(marker)})
    with pytest.raises(L.LungsegCheckpointError, match=naming(path, "refused")) as error:
        L.load_checkpoint(path)
    assert not marker.exists(), "loading must not run the code"
    assert "weights_only=False" not in str(error.value) and "weights_only` set to `False" not in str(error.value)
    torch.load(path, weights_only=False)  # what the refusal prevents: an unsafe load runs the payload
    assert marker.exists(), "the check must be able to fail: this payload runs code when loaded unsafely"


def test_checkpoint_of_another_architecture(tmp_path, random_model):
    path = tmp_path / "r18.pt"
    L.save_checkpoint(path, random_model, L.TrainConfig(encoder="resnet34"))  # resnet18 weights
    with pytest.raises(L.LungsegCheckpointError, match=naming(path, "resnet34")):
        L.load_checkpoint(path)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"encoder": "resnet9000", "image_size": 256}, "resnet9000"),
        ("resnet34", "not a dict"),
        ({"encoder": "resnet34"}, "lacks image_size"),
        ({"image_size": 256}, "lacks encoder"),
        ({"encoder": "resnet34", "image_size": 100}, "multiple of 32"),
    ],
)
def test_bad_configs(tmp_path, config, message):
    path = write_payload(tmp_path / "bad.pt", {"model_state": {}, "config": config})
    with pytest.raises(L.LungsegCheckpointError, match=naming(path, message)):
        L.load_checkpoint(path)


def test_not_a_lungseg_checkpoint(tmp_path):
    with pytest.raises(L.LungsegCheckpointError, match=naming("other.pt", "not a lungseg checkpoint")):
        L.load_checkpoint(write_payload(tmp_path / "other.pt", {"something": torch.zeros(1)}))
    with pytest.raises(L.LungsegCheckpointError, match=naming("list.pt", "holds a list")):
        L.load_checkpoint(write_payload(tmp_path / "list.pt", [torch.zeros(1)]))


def test_missing_empty_and_folder(tmp_path):
    with pytest.raises(L.LungsegCheckpointError, match=naming("missing.pt", "not found")):
        L.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(L.LungsegCheckpointError, match=naming("empty.pt", "is empty")):
        L.load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(L.LungsegCheckpointError, match=naming(tmp_path, "is a folder")):
        L.load_checkpoint(tmp_path)


def test_plain_types_survive_weights_only_loading(tmp_path, random_model):
    import numpy as np

    config = L.TrainConfig(lr=np.float64(0.001), rotate_limit=np.int64(20), weights=tmp_path / "w.safetensors")
    path = tmp_path / "plain.pt"
    L.save_checkpoint(path, random_model, config, history=[{"epoch": np.int64(1), "val_loss": np.float32(0.5)}])
    payload = L.read_checkpoint(path)
    assert payload["config"]["weights"] == str(tmp_path / "w.safetensors")
    assert type(payload["config"]["lr"]) is float and type(payload["config"]["rotate_limit"]) is int
    assert payload["history"] == [{"epoch": 1, "val_loss": 0.5}]

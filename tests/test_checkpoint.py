"""Every bad checkpoint gives the module's own error, naming the file and what to do."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lungseg_utils as L


class RunsCode:
    """Pickles to a call of os.system: what a hostile 'checkpoint' would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "best.pt"
    L.save_checkpoint(path, L.build_model("resnet18", weights=None), L.TrainConfig(encoder="resnet18", image_size=64), epoch=1)
    return path


def write_payload(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


def test_good_checkpoint_loads_and_stores_versions(good_checkpoint):
    model = L.load_checkpoint(good_checkpoint)
    assert model.lungseg_config["encoder"] == "resnet18" and model.lungseg_checkpoint == good_checkpoint
    versions = L.read_checkpoint(good_checkpoint)["versions"]
    assert versions["torch"] == torch.__version__ and type(versions["torch"]) is str


def test_truncated_checkpoint(good_checkpoint, tmp_path):
    cut = tmp_path / "cut.pt"
    data = good_checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(L.LungsegCheckpointError, match=r"cut\.pt: the checkpoint is damaged or truncated.*Copy it again, or train again"):
        L.load_checkpoint(cut)


def test_text_file(tmp_path):
    (tmp_path / "notes.pt").write_text("epoch 12: val loss 0.1\n")
    with pytest.raises(L.LungsegCheckpointError, match=r"notes\.pt: not a PyTorch checkpoint.*best\.pt written by train"):
        L.load_checkpoint(tmp_path / "notes.pt")


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = write_payload(tmp_path / "evil.pt", {"model_state": {}, "config": {"encoder": "resnet18", "image_size": 64}, "x": RunsCode(marker)})
    with pytest.raises(L.LungsegCheckpointError, match=r"evil\.pt: refused.*could run code") as error:
        L.load_checkpoint(path)
    assert not marker.exists(), "loading must not run the code"
    assert "weights_only=False" not in str(error.value) and "weights_only` set to `False" not in str(error.value)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "r18.pt"
    L.save_checkpoint(path, L.build_model("resnet18", weights=None), L.TrainConfig(encoder="resnet34"))
    with pytest.raises(L.LungsegCheckpointError, match=r"r18\.pt: weights do not fit a U-Net with encoder 'resnet34'"):
        L.load_checkpoint(path)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"encoder": "resnet9000", "image_size": 256}, r"unknown encoder 'resnet9000'"),
        ("resnet34", r"its config is a str, not a dict"),
        ({"encoder": "resnet34"}, r"its config lacks image_size"),
        ({"image_size": 256}, r"its config lacks encoder"),
        ({"encoder": "resnet34", "image_size": 100}, r"image_size 100 is not a positive multiple of 32"),
    ],
)
def test_bad_configs(tmp_path, config, message):
    path = write_payload(tmp_path / "bad.pt", {"model_state": {}, "config": config})
    with pytest.raises(L.LungsegCheckpointError, match=r"bad\.pt: " + message):
        L.load_checkpoint(path)


def test_not_a_lungseg_checkpoint(tmp_path):
    with pytest.raises(L.LungsegCheckpointError, match=r"other\.pt: not a lungseg checkpoint"):
        L.load_checkpoint(write_payload(tmp_path / "other.pt", {"something": torch.zeros(1)}))
    with pytest.raises(L.LungsegCheckpointError, match=r"list\.pt: holds a list"):
        L.load_checkpoint(write_payload(tmp_path / "list.pt", [torch.zeros(1)]))


def test_missing_empty_and_folder(tmp_path):
    with pytest.raises(L.LungsegCheckpointError, match=r"Checkpoint not found: .*missing\.pt\. Train a model first"):
        L.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(L.LungsegCheckpointError, match=r"empty\.pt: the file is empty"):
        L.load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(L.LungsegCheckpointError, match="is a folder"):
        L.load_checkpoint(tmp_path)


def test_plain_types_survive_weights_only_loading(tmp_path):
    import numpy as np

    config = L.TrainConfig(lr=np.float64(0.001), rotate_limit=np.int64(20), weights=tmp_path / "w.safetensors")
    path = tmp_path / "plain.pt"
    L.save_checkpoint(path, L.build_model("resnet18", weights=None), config, history=[{"epoch": np.int64(1), "val_loss": np.float32(0.5)}])
    payload = L.read_checkpoint(path)
    assert payload["config"]["weights"] == str(tmp_path / "w.safetensors")
    assert type(payload["config"]["lr"]) is float and type(payload["config"]["rotate_limit"]) is int
    assert payload["history"] == [{"epoch": 1, "val_loss": 0.5}]

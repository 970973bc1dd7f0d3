"""Every error a user can cause is one clear line: a LungsegError naming the file (or setting) and the fix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lungseg_io
import lungseg_utils as L
from conftest import dicom_bytes, lung_mask, naming, tiny_arrays, tiny_config, write_kaggle_layout


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    Image.fromarray(lung_mask(64)).save(path)

    def refused(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(lungseg_io, "open", refused, raising=False)  # root reads every file: refuse it here
    with pytest.raises(L.LungsegDataError, match=naming(path, "permission denied")):
        L.decode_image(path)


def test_a_lab_tiff_is_refused_with_its_colour_mode(tmp_path):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (64, 64)).save(path)
    with pytest.raises(L.LungsegDataError, match=naming(path, "LAB")):
        L.decode_image(path)


@pytest.mark.parametrize("tags, damage", [(dict(WindowCenter=100, WindowWidth=0), None),
                                          (dict(RescaleSlope="7.123456", RescaleIntercept=0), (b"7.123456", b"abcdefgh"))],
                         ids=["window width 0", "rescale slope not a number"])
def test_dicom_grey_level_tags_that_cannot_work_are_named(tmp_path, tags, damage):
    data = dicom_bytes(np.arange(64 * 64).reshape(64, 64) % 4096, **tags)
    if damage:  # pydicom refuses to write such a value: put it into the file's bytes
        assert data.count(damage[0]) == 1
        data = data.replace(*damage)
    path = tmp_path / "odd.dcm"
    path.write_bytes(data)
    with pytest.raises(L.LungsegDataError, match=naming(path, "grey-level tags")):
        L.decode_image(path)


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, tiny_checkpoint, real_xray, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "masks"
    status = lungseg_io.main(["predict", str(real_xray), "--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert status == 1 and len(error.splitlines()) == 1 and "Cannot create the output folder" in error and str(out) in error


@pytest.mark.parametrize("masks", [0, 4])
def test_train_on_too_few_masks_says_what_the_split_needs(tmp_path, capsys, masks):
    base = write_kaggle_layout(tmp_path / "data", n=2)
    for path in sorted((base / "masks").iterdir())[masks:]:
        path.unlink()
    status = lungseg_io.main(["train", "--data-dir", str(tmp_path / "data"), "--quick", "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip()
    assert status == 1 and len(error.splitlines()) == 1
    assert f"{masks} X-rays with a mask are too few" in error and "about 10" in error


def test_arrays_of_another_size_than_the_models_are_refused(random_model):
    with pytest.raises(L.LungsegDataError, match=naming("(N, 64, 64)", "predict")):
        L.predict_arrays(random_model, np.zeros((2, 128, 128), np.uint8))
    with pytest.raises(L.LungsegDataError, match="at the model's size"):
        L.predict_arrays(random_model, np.zeros((64, 64), np.uint8))


def test_a_checkpoint_asking_for_an_absurd_size_is_refused_before_building(tmp_path, tiny_checkpoint):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["config"]["image_size"] = 1 << 20
    path = tmp_path / "huge.pt"
    torch.save(payload, path)
    with pytest.raises(L.LungsegCheckpointError, match=naming(path, "larger than any X-ray needs")):
        L.load_checkpoint(path)


def test_a_training_set_with_an_empty_mask_is_refused(tmp_path):
    images, masks = tiny_arrays(8)
    masks[3] = 0
    with pytest.raises(L.LungsegDataError, match=naming("number 3", "no lung")):
        L.train((images, masks), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(epochs=1))
    assert not (tmp_path / "run").exists(), "nothing is written for a refused training set"

"""Nothing a user has is lost: a full disk, file names that are not UTF-8, two inputs of one name, a damaged cache,
a run stopped during its first checkpoint."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

import lungseg_utils as L
from conftest import CLI, naming, tiny_arrays, tiny_config



def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "256k"):
    """A tmpfs of ``size`` mounted on ``folder`` (root only, else the test skips saying why)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a small filesystem needs root to mount a tmpfs; the simulated ENOSPC tests cover the rest")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs was refused here; the simulated ENOSPC tests cover the rest")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill ``folder``'s filesystem, leaving at most ``leave`` bytes."""
    with open(folder / "filler", "wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 4096)
    if leave:
        os.truncate(folder / "filler", os.path.getsize(folder / "filler") - leave)


def test_a_failed_write_removes_its_temporary_file_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "mask.png"
    target.write_bytes(b"previous")

    def half_written(file):
        file.write(b"half")
        full_disk()

    with pytest.raises(L.LungsegError, match=naming(target, "disk is full")):
        L.write_atomically(target, half_written)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


def test_a_checkpoint_that_cannot_be_written_leaves_last_pt_as_it_was(tmp_path, random_model, monkeypatch):
    last = tmp_path / "last.pt"
    L.save_checkpoint(last, random_model, tiny_config(), epoch=1)
    before = last.read_bytes()
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(L.LungsegError, match=naming(last, "disk is full")):
        L.save_checkpoint(last, random_model, tiny_config(), epoch=2)
    assert last.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_predict_on_a_full_disk_fails_each_file_and_writes_no_empty_mask(tmp_path, tiny_checkpoint, real_xray):
    image = tmp_path / "xray.png"
    image.write_bytes(real_xray.read_bytes())
    with small_filesystem(tmp_path / "small") as out:
        fill(out)
        result = subprocess.run([*CLI, "predict", str(image), "--checkpoint", str(tiny_checkpoint), "--out", str(out)],
                                capture_output=True, text=True, timeout=300)
        left = sorted(path.name for path in out.iterdir())
    assert result.returncode == 1 and "disk is full" in result.stderr and "0 done" in result.stdout
    assert left == ["filler"], "no 0-byte mask and no temporary file"


def test_a_checkpoint_on_a_full_filesystem_keeps_the_previous_one(tmp_path, random_model):
    with small_filesystem(tmp_path / "small", size="200m") as run:
        last = run / "last.pt"
        L.save_checkpoint(last, random_model, tiny_config(), epoch=1)
        before = last.read_bytes()
        fill(run, leave=4096)
        with pytest.raises(L.LungsegError, match=naming(last, "disk is full")):
            L.save_checkpoint(last, random_model, tiny_config(), epoch=2)
        assert last.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["filler", "last.pt"]


def test_file_names_that_are_not_utf8_are_predicted_and_named(tmp_path, tiny_checkpoint, real_xray):
    folder = os.fsencode(tmp_path)
    odd = os.path.join(folder, b"r\xe9sum\xe9 \xff.png")  # Latin-1 bytes: not UTF-8
    with open(odd, "wb") as file:
        file.write(real_xray.read_bytes())
    result = subprocess.run([*CLI, "predict", odd, "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out")],
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(os.fsencode(tmp_path / "out"))) == [b"predictions.csv", b"r\xe9sum\xe9 \xff_mask.png"]
    assert b"1 done" in result.stdout and b"\\xe9" in result.stdout  # named, with the bytes it cannot print escaped


def test_force_never_overwrites_a_mask_written_earlier_in_the_same_run(tmp_path, tiny_checkpoint, real_xray):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    cv2.imwrite(str(tmp_path / "a" / "chest.png"), cv2.imread(str(real_xray), cv2.IMREAD_GRAYSCALE))
    cv2.imwrite(str(tmp_path / "b" / "chest.png"), 255 - cv2.imread(str(real_xray), cv2.IMREAD_GRAYSCALE))
    args = ["predict", str(tmp_path / "a" / "chest.png"), str(tmp_path / "b" / "chest.png"),
            "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--force"]
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "1 done" in result.stdout
    assert "already wrote" in result.stderr and str(tmp_path / "b" / "chest.png") in result.stderr
    written = cv2.imread(str(tmp_path / "out" / "chest_mask.png"), cv2.IMREAD_GRAYSCALE)
    expected = L.predict(L.load_checkpoint(tiny_checkpoint), str(tmp_path / "a" / "chest.png"), postprocess=True, warn=False)
    assert (written == expected * 255).all(), "the first file's mask is kept"


def test_a_damaged_cache_entry_is_decoded_again_and_named(tmp_path, real_xray):
    rows = L.labeled_only(L.build_pairs_table(real_xray.parent.parent, read_sizes=False)).head(1)
    image, mask = L.cached_sample(rows.image_path[0], rows.mask_paths[0], 64, tmp_path)
    entry = next((tmp_path / "64px").glob("*.npy"))
    entry.write_bytes(entry.read_bytes()[:100])  # truncated after it was written
    with pytest.warns(L.LungsegWarning, match=naming(entry, "damaged")):
        again = L.cached_sample(rows.image_path[0], rows.mask_paths[0], 64, tmp_path)
    assert (again[0] == image).all() and (again[1] == mask).all()
    assert np.load(entry).shape == (2, 64, 64), "the entry is replaced"
    np.save(entry, np.zeros((1, 64, 64), np.uint8))  # a valid file of the wrong shape
    with pytest.warns(L.LungsegWarning, match="damaged"):
        assert (L.cached_sample(rows.image_path[0], rows.mask_paths[0], 64, tmp_path)[1] == mask).all()


def test_a_run_stopped_during_its_first_checkpoint_can_continue(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.1234.tmp").write_bytes(b"half a checkpoint")
    assert L.train(data, val, run, tiny_config(epochs=1)).history.epoch.tolist() == [1]
    assert not list(run.glob("*.tmp"))
    (run / "last.pt").rename(run / ".last.pt.1234.tmp")  # stopped while writing its first last.pt, after best.pt
    assert L.train(data, val, run, tiny_config(epochs=1)).history.epoch.tolist() == [1]
    (run / "last.pt").unlink()  # a best.pt alone, no trace of a stopped write: perhaps a model of the user's
    with pytest.raises(L.LungsegConfigError, match=naming(run, "resume=True")):
        L.train(data, val, run, tiny_config(epochs=1))
    assert L.train(data, val, run, tiny_config(epochs=1), resume=True).history.epoch.tolist() == [1]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(L.LungsegConfigError, match=naming("notes.txt", "new folder")):
        L.train(data, val, tmp_path / "mine", tiny_config(epochs=1))

"""The model the later chapters use: find_checkpoint, load_chapter_model, the fast lane, the quick model and Google Drive."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lungseg_utils as L
from conftest import REPO, naming, tiny_arrays, tiny_config, write_kaggle_layout


def test_find_checkpoint_prefers_argument_then_environment(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("LUNGSEG_CHECKPOINT", raising=False)
    monkeypatch.setattr(L, "CHAPTER_RUN_DIR", tmp_path / "nothing-here")
    monkeypatch.setattr(L, "DRIVE_CHECKPOINT", tmp_path / "no-drive" / "best.pt")
    assert L.find_checkpoint() is None
    monkeypatch.setenv("LUNGSEG_CHECKPOINT", str(tiny_checkpoint))
    assert L.find_checkpoint() == tiny_checkpoint
    argument = tmp_path / "argument.pt"
    shutil.copy(tiny_checkpoint, argument)
    assert L.find_checkpoint(argument) == argument, "an argument wins over LUNGSEG_CHECKPOINT"
    with pytest.raises(L.LungsegCheckpointError, match=naming("missing.pt", "not found")):
        L.find_checkpoint(tmp_path / "missing.pt")
    monkeypatch.setenv("LUNGSEG_CHECKPOINT", str(tmp_path / "typo.pt"))
    with pytest.raises(L.LungsegCheckpointError, match=naming("typo.pt", "LUNGSEG_CHECKPOINT")):  # never a silent new model
        L.load_chapter_model()


def test_loaded_checkpoint_describes_itself(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("LUNGSEG_CHECKPOINT", str(tiny_checkpoint))
    model, description = L.load_chapter_model()
    assert model.lungseg_config["weights_loaded"] == "None" and model.lungseg_config["epoch"] == 1
    assert "initial encoder weights: random init" in description and "resnet18" in description
    assert "augmentation: framing + strong photometric + CLAHE + simulated opacities (p 0.3)" in description
    mild = L.describe_augmentation(asdict(L.TrainConfig(framing=False, strong_photometric=False, clahe=False, opacity_p=0)))
    assert mild == "augmentation: rotation, scale, shift and mild photometric changes"


def test_loaded_model_knows_its_checkpoint(tiny_checkpoint):
    assert L.load_checkpoint(tiny_checkpoint).lungseg_checkpoint == tiny_checkpoint


def test_quick_fallback_model_folder_is_removed_when_python_exits(tmp_path):
    """Without a checkpoint the quick model is trained in a temporary folder that lives as long as the process."""
    write_kaggle_layout(tmp_path / "data", n=20)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = (
        "import lungseg_utils as L, pathlib\n"
        "L.CHAPTER_RUN_DIR, L.DRIVE_CHECKPOINT = pathlib.Path('/nonexistent'), pathlib.Path('/nonexistent/best.pt')\n"
        "L.TrainConfig.quick = classmethod(lambda cls, **overrides: cls(image_size=64, epochs=1, max_images=12))\n"
        f"model, said = L.load_chapter_model({str(tmp_path / 'data')!r})\n"
        "print('CHECKPOINT', model.lungseg_checkpoint, model.lungseg_checkpoint.is_file())\n"
        "print('SAID', said)\n"
    )
    # No GPU either: with one, load_chapter_model would train chapter 03's full recipe instead of the quick model.
    env = {**os.environ, "TMPDIR": str(scratch), "LUNGSEG_CACHE_DIR": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "",
           "LUNGSEG_QUICK": "1"}  # in full mode a CPU trains the fast lane instead
    env.pop("LUNGSEG_CHECKPOINT", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("CHECKPOINT"))
    assert line.endswith("True") and str(scratch) in line, "best.pt exists while the process runs"
    assert "quick-mode model trained just now" in result.stdout
    assert not list(scratch.iterdir()), "the temporary run folder is removed at exit"


# ---------------------------------------------------------------- without a checkpoint
def fake_train(calls: list):
    """A stand-in for train() that records its arguments and returns a tiny model."""
    def train(train_arrays, val_arrays, run_dir, config, resume=False, **kwargs):
        calls.append(dict(run_dir=Path(run_dir), config=config, n_train=len(train_arrays[0]), resume=resume))
        model = L.build_model("resnet18", weights=None)
        model.lungseg_config.update(asdict(config), weights_loaded="None", epoch=config.epochs)
        return L.TrainResult(model, pd.DataFrame(), Path(run_dir), config.epochs, 0.1, 1.0, "simulated")
    return train


@pytest.fixture
def no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("LUNGSEG_CHECKPOINT", raising=False)
    monkeypatch.setattr(L, "CHAPTER_RUN_DIR", tmp_path / "runs" / "dicebce-256px")
    monkeypatch.setattr(L, "DRIVE_CHECKPOINT", tmp_path / "drive" / "best.pt")
    monkeypatch.setattr(L, "FAST_RUN_DIR", tmp_path / "runs" / "fast-resnet18-128px")
    monkeypatch.setattr(L, "load_arrays", lambda rows, size, *a, **k: (np.zeros((len(rows), size, size), np.uint8),) * 2)
    calls = []
    monkeypatch.setattr(L, "train", fake_train(calls))
    return calls


def test_without_checkpoint_a_gpu_trains_chapter_03s_recipe_and_says_so(no_checkpoint, monkeypatch, real_data_dir, capsys):
    monkeypatch.setattr(L, "pick_device", lambda preferred=None: torch.device("cuda"))
    model, said = L.load_chapter_model(real_data_dir)
    call = no_checkpoint[0]
    chapter_03_split = L.three_way_split(L.build_pairs_table(real_data_dir))
    assert call["run_dir"] == L.CHAPTER_RUN_DIR and call["n_train"] == len(chapter_03_split["train"])
    assert (call["config"].image_size, call["config"].epochs, call["config"].weights, call["config"].lr) == (256, 20, None, 1e-3)
    assert "training chapter 03's recipe on this GPU now" in capsys.readouterr().out
    assert "trained just now by this chapter" in said


def test_without_checkpoint_a_cpu_trains_the_fast_lane_on_every_xray_and_says_so(no_checkpoint, monkeypatch, real_data_dir, capsys):
    monkeypatch.setattr(L, "pick_device", lambda preferred=None: torch.device("cpu"))
    monkeypatch.setenv("LUNGSEG_QUICK", "0")
    model, said = L.load_chapter_model(real_data_dir)
    call = no_checkpoint[0]
    assert call["run_dir"] == L.FAST_RUN_DIR and not call["resume"]
    assert call["n_train"] == len(L.three_way_split(L.build_pairs_table(real_data_dir))["train"]), "every training X-ray"
    assert (call["config"].encoder, call["config"].image_size, call["config"].epochs) == ("resnet18", 128, 12)
    assert asdict(call["config"]) == asdict(L.TrainConfig.fast())
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "training the fast lane" in printed[0] and "chapter 03's model" in printed[0]
    assert "the fast lane" in said and "NO TRAINED MODEL" not in said


def test_a_finished_fast_lane_run_is_loaded_and_an_interrupted_one_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LUNGSEG_CHECKPOINT", raising=False)
    monkeypatch.setenv("LUNGSEG_QUICK", "0")
    monkeypatch.setattr(L, "CHAPTER_RUN_DIR", tmp_path / "runs" / "dicebce-256px")
    monkeypatch.setattr(L, "DRIVE_CHECKPOINT", tmp_path / "drive" / "best.pt")
    monkeypatch.setattr(L, "FAST_RUN_DIR", tmp_path / "runs" / "fast-resnet18-128px")
    monkeypatch.setattr(L, "pick_device", lambda preferred=None: torch.device("cpu"))
    L.train(tiny_arrays(8), tiny_arrays(4, seed=1), L.FAST_RUN_DIR, tiny_config(epochs=1))
    capsys.readouterr()
    calls = []
    monkeypatch.setattr(L, "train", fake_train(calls))
    monkeypatch.setattr(L.TrainConfig, "fast", classmethod(lambda cls, **overrides: tiny_config(epochs=1)))
    model, said = L.load_chapter_model()
    assert not calls and not capsys.readouterr().out, "a finished run is loaded silently, not trained again"
    assert said.startswith("checkpoint fast-resnet18-128px/best.pt") and "the fast lane" in said
    monkeypatch.setattr(L.TrainConfig, "fast", classmethod(lambda cls, **overrides: tiny_config(epochs=2)))
    monkeypatch.setattr(L, "build_pairs_table", lambda data_dir=None: pd.DataFrame())
    monkeypatch.setattr(L, "three_way_split", lambda table: {"train": table, "val": table})
    monkeypatch.setattr(L, "load_arrays", lambda rows, size, *a, **k: tiny_arrays(4, size))
    L.load_chapter_model()
    assert calls and calls[0]["resume"] and calls[0]["run_dir"] == L.FAST_RUN_DIR, "one epoch of two: resumed"


def test_without_checkpoint_a_cpu_in_quick_mode_shows_a_banner_and_trains_the_quick_model(no_checkpoint, monkeypatch, real_data_dir, capsys):
    monkeypatch.setattr(L, "pick_device", lambda preferred=None: torch.device("cpu"))
    monkeypatch.setenv("LUNGSEG_QUICK", "1")
    model, said = L.load_chapter_model(real_data_dir)
    call = no_checkpoint[0]
    quick_split = L.quick_subset(L.three_way_split(L.build_pairs_table(real_data_dir)), L.TrainConfig.quick().max_images)
    assert (call["config"].image_size, call["config"].epochs) == (128, 2) and call["n_train"] == len(quick_split["train"]) < 100
    out = capsys.readouterr().out
    assert "NO TRAINED MODEL FOUND" in out and "NOT the stored ones" in out and "run chapter 03" in out
    assert said.startswith("quick-mode model trained just now")


def test_a_checkpoint_in_google_drive_is_found(no_checkpoint, tiny_checkpoint):
    L.DRIVE_CHECKPOINT.parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, L.DRIVE_CHECKPOINT)
    assert L.find_checkpoint() == L.DRIVE_CHECKPOINT
    model, said = L.load_chapter_model()
    assert said.startswith("checkpoint drive/best.pt") and not no_checkpoint, "nothing is trained"

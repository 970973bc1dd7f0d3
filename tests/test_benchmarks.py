"""The benchmark scripts' own logic: the packed copy for a lent GPU, and the recipe screen's summary."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, naming, write_kaggle_layout

import lungseg_utils as L


def load_script(name: str):
    """Import ``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packed_copy_gives_identical_arrays_and_refuses_to_overwrite(tmp_path, monkeypatch):
    pack = load_script("pack_data")
    write_kaggle_layout(tmp_path / "original", size=96)
    monkeypatch.setenv("LUNGSEG_DATA_DIR", str(tmp_path / "original"))
    out = tmp_path / "packed"
    monkeypatch.setattr(sys, "argv", ["pack_data.py", "--size", "64", "--out", str(out)])
    pack.main()
    original, packed = L.build_pairs_table(tmp_path / "original"), L.build_pairs_table(out)
    assert sorted(packed.name) == sorted(original.name)
    assert packed.labeled.sum() == original.labeled.sum() == 8
    labeled = original[original.labeled].sort_values("name")
    copy = packed[packed.labeled].sort_values("name")
    for a, b in zip(L.load_arrays(labeled, 64), L.load_arrays(copy, 64)):
        assert np.array_equal(a, b)
    with pytest.raises(SystemExit, match=naming(out, "already exists")):
        pack.main()


def screen_scores(seed: int, offset: float) -> pd.DataFrame:
    """Per-image scores shaped like ``shift_benchmark``'s, for two images of each hospital and one shift."""
    names = ["MCUCXR_0001_0", "MCUCXR_0002_1", "CHNCXR_0001_0", "CHNCXR_0002_1"]
    rows = []
    for shift in ("none", "blur"):
        for i, name in enumerate(names):
            clean = 0.95 + 0.01 * i + offset
            rows.append(dict(name=name, shift=shift, severity=0 if shift == "none" else 2, seed=seed,
                             source="Montgomery" if name.startswith("MC") else "Shenzhen", warned=False,
                             clean_dice=clean, dice=clean - (0.0 if shift == "none" else 0.02)))
    return pd.DataFrame(rows)


def test_screen_summary_averages_seeds_and_pairs_with_the_baseline():
    screen = load_script("recipe_screen")
    lines: list[str] = []
    scores = pd.concat([screen_scores(42, 0.0), screen_scores(43, 0.01)])
    baseline = screen_scores(42, -0.005).groupby(["name", "shift"], as_index=False).dice.mean()
    screen.summarize(scores, baseline, lines.append, "all")
    text = "\n".join(lines)
    assert "Montgomery val, clean: seed 42 0.9550, seed 43 0.9650; seed 43 minus seed 42 +0.0100 [" in text
    assert "16 shifts at moderate severity: seed 42 0.9450, seed 43 0.9550; seed 43 minus seed 42 +0.0100" in text
    assert "Montgomery val, clean: mean Dice 0.9600 (n=2); against baseline +0.0100" in text
    assert "Shenzhen val, clean: mean" in text and "the other hospital" not in text
    assert "drop under the shifts from the same images clean: 0.0200" in text
    assert "per shift against baseline: blur +0.0100" in text
    lines.clear()
    screen.summarize(scores, baseline, lines.append, "all", reference="travel")
    assert "per shift against travel: blur +0.0100" in "\n".join(lines)


def test_screen_reuses_stored_seeds_and_trains_only_the_missing_ones(tmp_path, monkeypatch):
    screen = load_script("recipe_screen")
    stored = tmp_path / "travel.csv"
    screen_scores(42, 0.0).to_csv(stored, index=False)
    trained = []

    kept_in = []

    def fake_training(name, split, log, epochs, train_on, seed, keep_runs=None):
        trained.append(seed)
        kept_in.append(keep_runs)
        return screen_scores(seed, 0.01)

    monkeypatch.setattr(screen, "score_candidate", fake_training)
    lines: list[str] = []
    scores = screen.train_missing_seeds("travel", [42, 43], stored, {}, lines.append, 20, "montgomery", tmp_path / "runs")
    assert trained == [43] and sorted(scores.seed.unique()) == [42, 43]
    assert kept_in == [tmp_path / "runs"], "--keep-runs reaches the training of each missing seed"
    assert lines == ["candidate travel, seed 42: scores stored in travel.csv, reused"]
    assert np.allclose(scores[scores.seed == 42].dice, screen_scores(42, 0.0).dice)
    trained.clear()
    scores.to_csv(stored, index=False)
    assert len(screen.train_missing_seeds("travel", [42], stored, {}, lines.append, 20, "montgomery")) == len(scores)
    assert trained == [], "a stored second seed is kept, not dropped or trained again"


def test_screen_scores_a_checkpoint_only_as_the_candidate_it_was_trained_as(tmp_path, random_model):
    screen = load_script("recipe_screen")
    assert screen.CANDIDATES["travel_equalized"] == {key: getattr(L.TrainConfig(), key) for key in screen.RECIPE_FIELDS}
    path = tmp_path / "best.pt"
    config = L.TrainConfig(encoder="resnet18", image_size=64, **screen.CANDIDATES["baseline"])
    L.save_checkpoint(path, random_model, config, epoch=3, val_loss=0.5)
    assert screen.load_candidate_checkpoint("baseline", path).lungseg_config["epoch"] == 3
    with pytest.raises(SystemExit, match=naming(path, "not candidate 'travel'")):
        screen.load_candidate_checkpoint("travel", path)

"""Model building and weights, the loss, the metrics, training with resume, inference and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file

import lungseg_io
import lungseg_utils as L
from conftest import REPO, StandInModel, lung_mask


# ---------------------------------------------------------------- model and weights
def test_build_model_shapes_and_no_skip_variant():
    x = torch.randn(2, 3, 64, 64)
    model = L.build_model("resnet18", weights=None).eval()
    assert model(x).shape == (2, 1, 64, 64)
    no_skip = L.build_model("resnet18", weights=None, skip_connections=False).eval()
    assert L.count_parameters(no_skip) == L.count_parameters(model)
    features = no_skip.encoder(x)
    assert all((f == 0).all() for f in features[:-1]) and (features[-1] != 0).any()


def test_imagenet_offline_falls_back_fast_with_one_warning(monkeypatch):
    monkeypatch.setattr(lungseg_io, "cached_imagenet_state", lambda encoder: None)
    monkeypatch.setattr(lungseg_io, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(lungseg_io, "_warned_offline", False)
    started = time.perf_counter()
    with pytest.warns(UserWarning, match="random initialization"):
        model = L.build_model("resnet18", weights="imagenet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.build_model("resnet18", weights="imagenet")  # warned once only
    assert time.perf_counter() - started < 10
    assert model.lungseg_config["weights"] is None


def test_hub_unreachable_is_detected_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert lungseg_io.hub_reachable() is False


def test_imagenet_weights_from_local_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    settings = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]
    reference = L.build_model("resnet18", weights=None).encoder.state_dict()
    snapshot = tmp_path / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(lungseg_io, "hub_reachable", lambda *a, **k: pytest.fail("must not go online"))
    model = L.build_model("resnet18", weights="imagenet")
    assert model.lungseg_config["weights"] == "imagenet (Hugging Face cache)"
    for key, value in reference.items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value)


def test_weights_from_local_files(tmp_path):
    source = L.build_model("resnet18", weights=None)
    encoder_state = {k: v.contiguous() for k, v in source.encoder.state_dict().items()}
    save_file(encoder_state, str(tmp_path / "encoder.safetensors"))
    model = L.build_model("resnet18", weights=tmp_path / "encoder.safetensors")
    torch.testing.assert_close(model.encoder.conv1.weight, source.encoder.conv1.weight)
    torch.save(source.state_dict(), tmp_path / "whole.pth")
    model = L.build_model("resnet18", weights=tmp_path / "whole.pth")
    torch.testing.assert_close(model.decoder.state_dict(), source.decoder.state_dict())
    with pytest.raises(L.LungsegDataError, match=r"encoder\.safetensors: these weights do not fit"):
        L.build_model("resnet34", weights=tmp_path / "encoder.safetensors")


# ---------------------------------------------------------------- loss
@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_dicebce_equals_smp_dice_plus_bce(smooth):
    """smp >= 0.5 writes Dice as (I + s) / (card / 2 + s): its smooth s is our 2 s."""
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 32, 32) * 3
    targets = (torch.rand(4, 1, 32, 32) > 0.6).float()
    ours = L.DiceBCELoss(smooth=2 * smooth)(logits, targets)
    reference = smp.losses.DiceLoss("binary", from_logits=True, smooth=smooth)(logits, targets) + torch.nn.BCEWithLogitsLoss()(logits, targets)
    torch.testing.assert_close(ours, reference)
    empty = torch.zeros_like(targets)
    torch.testing.assert_close(
        L.DiceBCELoss(smooth=2 * smooth)(logits, empty),
        smp.losses.DiceLoss("binary", from_logits=True, smooth=smooth)(logits, empty) + torch.nn.BCEWithLogitsLoss()(logits, empty),
    )


def test_dicebce_is_low_for_a_good_prediction_and_differentiable():
    targets = torch.from_numpy(lung_mask() // 255).float()[None, None]
    good = (targets * 2 - 1) * 8
    bad = -good
    loss_fn = L.DiceBCELoss()
    assert loss_fn(good, targets) < 0.01 < 1.5 < loss_fn(bad, targets)
    logits = torch.zeros_like(targets, requires_grad=True)
    loss_fn(logits, targets).backward()
    assert logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- metrics
def test_dice_iou_per_image_known_values():
    target = np.zeros((2, 10, 10), np.uint8)
    target[:, :, :5] = 1  # 50 pixels
    pred = np.zeros_like(target)
    pred[0, :, :5] = 1  # perfect
    pred[1, :, 2:7] = 1  # 30 overlap of 50 + 50
    dice, iou = L.dice_iou_per_image(pred, target)
    np.testing.assert_allclose(dice, [1.0, 0.6], atol=1e-6)
    np.testing.assert_allclose(iou, [1.0, 30 / 70], atol=1e-6)
    empty = np.zeros((1, 10, 10), np.uint8)
    assert L.dice_iou_per_image(empty, empty)[0][0] == 1.0


def test_dataset_dice_pools_pixels():
    target = np.zeros((2, 10, 10), np.uint8)
    target[0] = 1  # 100 px
    target[1, 0, :4] = 1  # 4 px
    pred = target.copy()
    pred[1] = 0  # miss the small one entirely
    assert L.dice_iou_per_image(pred, target)[0].mean() == pytest.approx(0.5)
    assert L.dataset_dice(pred, target) == pytest.approx(200 / 204)


def test_writeup_batch_dice_by_hand():
    probs = np.zeros((3, 4, 4))
    target = np.zeros((3, 4, 4))
    probs[0, :2] = 0.9
    target[0, :2] = 1  # perfect, 8 px
    probs[1, :1] = 0.9
    target[1, :2] = 1  # 4 of 8
    first = (2 * (8 + 4) + 1) / (12 + 16 + 1)
    third = 1.0  # empty both: (0 + 1) / (0 + 1)
    assert L.writeup_batch_dice(probs, target, batch_size=2) == pytest.approx((first + third) / 2)


def brute_force_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """HD95 from all pairwise distances between the two boundaries (no distance transform).

    A boundary pixel is a mask pixel with a 4-neighbour outside the mask (or outside the image).
    """
    from scipy.spatial.distance import cdist

    def boundary(mask):
        mask = mask.astype(bool)
        padded = np.pad(mask, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(mask & ~inner)

    distances = cdist(boundary(a), boundary(b))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def shapes(size: int = 64) -> dict[str, np.ndarray]:
    square = np.zeros((size, size), np.uint8)
    square[20:40, 20:40] = 1
    disc = np.zeros_like(square)
    cv2.circle(disc, (30, 34), 14, 1, -1)
    ring = disc.copy()
    cv2.circle(ring, (30, 34), 6, 0, -1)
    return {"square": square, "shifted square": np.roll(square, 3, axis=1), "disc": disc, "ring": ring,
            "lungs": lung_mask(size) // 255, "shifted lungs": lung_mask(size, shift=5) // 255,
            "speck": (np.arange(size * size).reshape(size, size) == 5 * size + 50).astype(np.uint8) | square}


@pytest.mark.parametrize("pair", [("square", "shifted square"), ("square", "disc"), ("disc", "ring"),
                                  ("lungs", "shifted lungs"), ("lungs", "disc"), ("square", "speck")])
def test_hausdorff95_equals_brute_force(pair):
    a, b = (shapes()[name] for name in pair)
    assert L.hausdorff95(a, b) == pytest.approx(brute_force_hd95(a, b), abs=1e-9)
    assert L.hausdorff95(a, a) == 0


def test_hausdorff95_of_shifted_square_is_the_shift():
    a = shapes()["square"]
    assert L.hausdorff95(a, np.roll(a, 3, axis=1)) == pytest.approx(3.0)


def test_empty_prediction_is_counted_not_dropped():
    square = shapes()["square"]
    hd95 = [L.hausdorff95(square, square), L.hausdorff95(np.zeros_like(square), square)]
    assert np.isnan(hd95[1])
    summary = L.summarize_scores(hd95)
    assert summary["missing"] == 1 and summary["n"] == 1


def bootstrap_coverage(interval, n_trials: int = 300, n: int = 40) -> float:
    """Share of trials whose interval covers the true mean (1.0) of a skewed distribution (exponential)."""
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(n_trials):
        low, high = interval(rng.exponential(1.0, n), trial)
        hits += low <= 1.0 <= high
    return hits / n_trials


def test_bootstrap_interval_has_its_nominal_coverage():
    def ours(values, trial):
        summary = L.summarize_scores(values, n_bootstrap=1000, seed=trial)
        return summary["ci_low"], summary["ci_high"]

    def mean_plus_minus_std(values, trial):  # a wrong "interval" the check must reject
        return values.mean() - values.std(), values.mean() + values.std()

    def too_narrow(values, trial):  # half the width of a correct interval
        half = values.std(ddof=1) / np.sqrt(len(values))
        return values.mean() - half, values.mean() + half

    def accepted(coverage: float) -> bool:
        return 0.88 <= coverage <= 0.985

    assert accepted(bootstrap_coverage(ours))
    assert not accepted(bootstrap_coverage(mean_plus_minus_std))
    assert not accepted(bootstrap_coverage(too_narrow))


def test_summarize_scores_percentiles():
    values = np.arange(1, 101, dtype=float)
    summary = L.summarize_scores(values)
    assert summary["p5"] == pytest.approx(5.95) and summary["p95"] == pytest.approx(95.05)
    assert summary["median"] == 50.5 and summary["n"] == 100 and summary["missing"] == 0


# ---------------------------------------------------------------- training
def tiny_arrays(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.stack([lung_mask(size, shift=int(s)) // 255 for s in rng.integers(-4, 5, n)])
    images = (masks * 120 + rng.integers(0, 60, masks.shape)).astype(np.uint8)
    return images, masks


def tiny_config(**overrides) -> L.TrainConfig:
    values = dict(encoder="resnet18", weights=None, image_size=64, epochs=3, batch_size=4, lr=1e-3, device="cpu")
    values.update(overrides)
    return L.TrainConfig(**values)


def test_train_writes_run_and_refuses_to_overwrite(tmp_path):
    result = L.train(tiny_arrays(8), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(epochs=2))
    for name in ("best.pt", "last.pt", "history.csv", "curves.png"):
        assert (tmp_path / "run" / name).is_file()
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history.epoch) == [1, 2] and (history.train_images_per_s > 0).all()
    assert result.best_epoch in (1, 2) and result.best_val_loss == history.val_loss.min()
    with pytest.raises(L.LungsegConfigError, match="already holds a run"):
        L.train(tiny_arrays(8), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(epochs=2))


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    config = tiny_config(schedule="onecycle")
    full = L.train(data, val, tmp_path / "full", config)

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L.train(data, val, tmp_path / "cut", config, on_epoch_end=interrupt)
    assert pd.read_csv(tmp_path / "cut" / "history.csv").epoch.tolist() == [1]
    resumed = L.train(data, val, tmp_path / "cut", config, resume=True)
    assert resumed.history.epoch.tolist() == [1, 2, 3]
    np.testing.assert_allclose(resumed.history.val_loss, full.history.val_loss, rtol=1e-4)
    last_full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model_state"]
    last_cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model_state"]
    for key in last_full:
        torch.testing.assert_close(last_cut[key], last_full[key], rtol=1e-4, atol=1e-5)


def test_early_stopping_stops_after_patience(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "run_epoch", lambda *args, **kwargs: {"loss": 1.0, "dice": 0.5})  # a loss that never improves
    result = L.train(tiny_arrays(8), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(epochs=6, patience=2))
    assert result.history.epoch.tolist() == [1, 2, 3] and result.best_epoch == 1


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(L.LungsegConfigError, match="Nothing to resume"):
        L.train(tiny_arrays(8), tiny_arrays(4), tmp_path / "new", tiny_config(), resume=True)


def test_resume_refuses_a_changed_config_naming_the_fields(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    L.train(data, val, tmp_path / "run", tiny_config(epochs=1))
    with pytest.raises(L.LungsegConfigError, match=r"config differs in epochs \(stored 1, now 2\); lr \(stored 0\.001, now 0\.01\)"):
        L.train(data, val, tmp_path / "run", tiny_config(epochs=2, lr=1e-2), resume=True)
    resumed = L.train(data, val, tmp_path / "run", tiny_config(epochs=1, num_workers=0, device="cpu"), resume=True)
    assert resumed.history.epoch.tolist() == [1]


def test_history_follows_last_checkpoint_if_the_csv_write_was_lost(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    config = tiny_config(epochs=3)

    def die_after_epoch_2(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L.train(data, val, tmp_path / "run", config, on_epoch_end=die_after_epoch_2)
    history_file = tmp_path / "run" / "history.csv"
    pd.read_csv(history_file).iloc[:1].to_csv(history_file, index=False)  # as if the process died before writing it
    resumed = L.train(data, val, tmp_path / "run", config, resume=True)
    assert resumed.history.epoch.tolist() == [1, 2, 3]
    assert pd.read_csv(history_file).epoch.tolist() == [1, 2, 3]


def interrupted_after_first_epoch(data, val, run_dir, config) -> None:
    """Start a run and stop it (as a kernel interrupt would) right after its first epoch."""

    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L.train(data, val, run_dir, config, on_epoch_end=interrupt)


def test_grad_scaler_state_is_saved_and_restored(tmp_path, monkeypatch):
    """fp16 autocast needs a GradScaler; its scale must survive a resume (forced here on the CPU)."""
    monkeypatch.setattr(L, "autocast_dtype", lambda device: torch.float16)
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    config = tiny_config(epochs=2)
    interrupted_after_first_epoch(data, val, tmp_path / "run", config)
    stored = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler_state"]
    assert stored and stored["scale"] > 0
    restored = {}
    original_load = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, state: restored.update(state) or original_load(self, state))
    resumed = L.train(data, val, tmp_path / "run", config, resume=True)
    assert restored["scale"] == stored["scale"] and resumed.history.epoch.tolist() == [1, 2]


def test_train_checks_image_size_against_config(tmp_path):
    with pytest.raises(L.LungsegDataError, match="config says image_size=128"):
        L.train(tiny_arrays(8), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(image_size=128))
    assert not (tmp_path / "run").exists(), "nothing is written for a run that cannot start"


def test_train_with_path_and_numpy_values_in_config_reloads_its_best_model(tmp_path):
    """A Path or a NumPy number in the config must not break the checkpoint (weights_only=True refuses them)."""
    source = L.build_model("resnet18", weights=None)
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    config = tiny_config(epochs=1, lr=np.float64(1e-3), rotate_limit=np.float32(20), weights=tmp_path / "encoder.safetensors")
    result = L.train(tiny_arrays(8), tiny_arrays(4, seed=1), tmp_path / "run", config)
    stored = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["config"]
    assert stored["weights"] == str(tmp_path / "encoder.safetensors")
    assert type(stored["lr"]) is float and type(stored["rotate_limit"]) is float
    assert result.model.lungseg_config["lr"] == pytest.approx(1e-3)


def test_workers_get_their_own_augmentation_streams():
    """Two DataLoader workers must not produce identical augmentations, and runs must repeat."""
    image = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    images = np.stack([image] * 4)
    masks = np.stack([lung_mask() // 255] * 4)
    dataset = L.LungDataset(images, masks, L.train_transforms())
    dataset.transform.set_random_seed(0)

    def augmented(worker_init_fn) -> list[torch.Tensor]:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=worker_init_fn)
        return [batch[0][0] for batch in loader]

    unseeded = augmented(None)
    assert torch.equal(unseeded[0], unseeded[1]), "without seed_worker both workers copy one generator (the bug)"
    first = augmented(L.seed_worker)
    assert not torch.equal(first[0], first[1]), "worker 0 and worker 1 augmented their first images identically"
    assert all(torch.equal(a, b) for a, b in zip(first, augmented(L.seed_worker))), "the same seed must give the same samples"


# ---------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    L.train(tiny_arrays(8), tiny_arrays(4, seed=1), run, tiny_config(epochs=1))
    return run / "best.pt"


def textured_image(size: int = 64) -> np.ndarray:
    """A smooth random 8-bit image spanning 0..255 (a random network's output varies over it)."""
    noise = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (7, 7), 3), None, 0, 255, cv2.NORM_MINMAX)


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    model = L.build_model("resnet18", weights=None).eval()
    model.lungseg_config["image_size"] = 64
    return model


def test_predict_uses_the_imagenet_normalisation(random_model):
    """predict_proba must equal the model on (x / 255 - mean) / std; wrong normalisations differ by far more."""
    gray = textured_image()
    mean, std = torch.tensor(L.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(L.IMAGENET_STD).view(3, 1, 1)
    pixels = torch.from_numpy(gray).float()[None].repeat(3, 1, 1)

    def model_on(tensor: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(random_model(tensor[None]))[0, 0].numpy()

    expected = model_on((pixels / 255 - mean) / std)
    actual = L.predict_proba(random_model, gray)
    tolerance = 0.02  # bf16 autocast on the CPU
    assert np.abs(actual - expected).max() < tolerance
    for wrong in ((pixels - mean) / std, pixels / 255, (pixels / 255 - 0.5) / 0.25):
        assert np.abs(model_on(wrong) - expected).max() > 3 * tolerance, "the check must be able to fail"


def test_predict_any_input_kind_gives_the_same_probabilities(random_model, real_xray):
    image_path = real_xray
    gray = L.decode_image(image_path)
    reference = L.predict_proba(random_model, gray)
    assert reference.shape == gray.shape and reference.std() > 0.01
    variants = {
        "path": image_path,
        "bytes": image_path.read_bytes(),
        "16-bit": gray.astype(np.uint16) * 257,
        "rgb": np.dstack([gray] * 3),
        "rgba": np.dstack([gray] * 3 + [np.full_like(gray, 255)]),
    }
    for name, image in variants.items():
        np.testing.assert_allclose(L.predict_proba(random_model, image), reference, atol=1e-6, err_msg=name)
    mask = L.predict(random_model, cv2.resize(gray, (300, 410)), warn=False)
    assert mask.shape == (410, 300) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    with pytest.raises(L.LungsegDataError, match="array: 20x20 px is too small"):
        L.predict(random_model, np.zeros((20, 20), np.uint8))


def test_predict_arrays_moves_the_model_to_the_device(random_model, monkeypatch):
    moved = []
    original = random_model.to
    monkeypatch.setattr(random_model, "to", lambda *args, **kwargs: moved.append(args) or original(*args, **kwargs))
    L.predict_arrays(random_model, textured_image()[None], device="cpu")
    assert moved and torch.device(moved[0][0]) == torch.device("cpu")


def test_postprocess_keeps_two_largest_and_fills_holes():
    mask = lung_mask(64) // 255
    mask[30:34, 20:22] = 0  # a hole in the left lung
    mask[2:4, 2:4] = 1  # a speck
    cleaned = L.postprocess_mask(mask)
    assert cleaned[2, 2] == 0 and cleaned[31, 21] == 1
    assert cv2.connectedComponents(cleaned)[0] - 1 == 2


def test_overlay_colours_at_known_pixels():
    image = np.full((64, 64), 100, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    picture = L.overlay(image, mask, color=(0, 200, 0), alpha=0.4)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
    assert tuple(picture[32, 32]) == (60, 140, 60), "inside: 60% gray + 40% green"
    assert tuple(picture[16, 32]) == (0, 200, 0), "outline in the pure colour"
    assert tuple(picture[2, 2]) == (100, 100, 100), "outside untouched"


def test_error_overlay_colours_at_known_pixels():
    image = np.full((64, 64), 100, np.uint8)
    truth = np.zeros((64, 64), np.uint8)
    truth[10:30, 10:30] = 1
    pred = np.roll(truth, 10, axis=1)  # columns 20..39
    errors = L.error_overlay(image, pred, truth, alpha=0.5)
    assert tuple(errors[20, 25]) == (50, 140, 50), "true positive: green"
    assert tuple(errors[20, 35]) == (165, 65, 65), "false positive: red"
    assert tuple(errors[20, 15]) == (70, 95, 177), "false negative: blue"
    assert tuple(errors[50, 50]) == (100, 100, 100), "true negative: untouched"


def test_evaluate_matches_known_dice_iou_and_hd95(tmp_path):
    base = tmp_path / "Lung Segmentation"
    (base / "CXR_png").mkdir(parents=True)
    (base / "masks").mkdir()
    truth = np.zeros((64, 64), np.uint8)
    truth[20:40, 20:40] = 255
    predicted = {"MCUCXR_0001_0": truth, "MCUCXR_0002_0": np.roll(truth, 4, axis=1), "MCUCXR_0003_1": np.zeros_like(truth)}
    for name, bright in predicted.items():
        cv2.imwrite(str(base / "CXR_png" / f"{name}.png"), np.where(bright > 0, 220, 20).astype(np.uint8))
        cv2.imwrite(str(base / "masks" / f"{name}.png"), truth)
    bright_is_lung = StandInModel(lambda x: (x[:, :1] > 0).float() * 20 - 10)
    scores, probs, masks = L.evaluate(bright_is_lung, L.labeled_only(L.build_pairs_table(tmp_path)))
    assert probs.shape == masks.shape == (3, 64, 64) and (masks == (truth > 0)).all()
    np.testing.assert_allclose(scores.dice, [1.0, 2 * 320 / 800, 0.0], atol=1e-6)
    np.testing.assert_allclose(scores.iou, [1.0, 320 / 480, 0.0], atol=1e-6)
    np.testing.assert_allclose(scores.dice_orig, scores.dice, atol=1e-6)
    assert scores.hd95[0] == 0 and scores.hd95[1] == pytest.approx(4.0) and np.isnan(scores.hd95[2])
    assert scores.empty_prediction.tolist() == [False, False, True]
    assert L.summarize_scores(scores.hd95)["missing"] == 1


# ---------------------------------------------------------------- finding a model
def test_find_checkpoint_prefers_argument_then_environment(small_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("LUNGSEG_CHECKPOINT", raising=False)
    monkeypatch.setattr(L, "CHAPTER_RUN_DIR", tmp_path / "nothing-here")
    assert L.find_checkpoint() is None
    monkeypatch.setenv("LUNGSEG_CHECKPOINT", str(small_checkpoint))
    assert L.find_checkpoint() == small_checkpoint
    with pytest.raises(L.LungsegCheckpointError, match="missing.pt"):
        L.find_checkpoint(tmp_path / "missing.pt")
    monkeypatch.setenv("LUNGSEG_CHECKPOINT", str(tmp_path / "typo.pt"))
    with pytest.raises(L.LungsegCheckpointError, match="LUNGSEG_CHECKPOINT=.*typo.pt"):  # never a silent new model
        L.load_chapter_model()


def test_loaded_checkpoint_describes_itself(small_checkpoint, monkeypatch):
    monkeypatch.setenv("LUNGSEG_CHECKPOINT", str(small_checkpoint))
    model, description = L.load_chapter_model()
    assert model.lungseg_config["weights_loaded"] == "None" and model.lungseg_config["epoch"] == 1
    assert "initial encoder weights: random init" in description and "resnet18" in description
    assert "augmentation: framing + strong photometric + CLAHE + simulated opacities (p 0.3)" in description
    mild = L.describe_augmentation(asdict(L.TrainConfig(framing=False, strong_photometric=False, clahe=False, opacity_p=0)))
    assert mild == "augmentation: rotation, scale, shift and mild photometric changes"


def test_loaded_model_knows_its_checkpoint(small_checkpoint):
    assert L.load_checkpoint(small_checkpoint).lungseg_checkpoint == small_checkpoint


def test_quick_fallback_model_folder_is_removed_when_python_exits(tmp_path):
    """Without a checkpoint the quick model is trained in a temporary folder that lives as long as the process."""
    from conftest import write_kaggle_layout

    write_kaggle_layout(tmp_path / "data", n=20)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = (
        "import lungseg_utils as L, pathlib\n"
        "L.CHAPTER_RUN_DIR = pathlib.Path('/nonexistent')\n"
        "L.TrainConfig.quick = classmethod(lambda cls, **overrides: cls(image_size=64, epochs=1, max_images=12))\n"
        f"model, said = L.load_chapter_model({str(tmp_path / 'data')!r})\n"
        "print('CHECKPOINT', model.lungseg_checkpoint, model.lungseg_checkpoint.is_file())\n"
        "print('SAID', said)\n"
    )
    env = {**os.environ, "TMPDIR": str(scratch), "LUNGSEG_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("LUNGSEG_CHECKPOINT", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("CHECKPOINT"))
    assert line.endswith("True") and str(scratch) in line, "best.pt exists while the process runs"
    assert "quick-mode model trained just now" in result.stdout
    assert not list(scratch.iterdir()), "the temporary run folder is removed at exit"


def test_hub_check_is_bounded_when_name_lookup_hangs(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(lungseg_io.socket, "getaddrinfo", lambda *args, **kwargs: time.sleep(30))
    started = time.perf_counter()
    assert lungseg_io.hub_reachable(timeout=0.5) is False
    assert time.perf_counter() - started < 3


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_gpu_precision_follows_compute_capability(monkeypatch, capability, expected):
    """A T4 (7.5) or V100 (7.0) gets fp16, whatever is_bf16_supported() claims; Ampere (8.0) and newer get bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert L.autocast_dtype(torch.device("cuda")) == expected


def test_seeding_asks_cudnn_for_repeatable_algorithms(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    L.seed_everything(1)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


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
    monkeypatch.setattr(L, "load_arrays", lambda rows, size, *a, **k: (np.zeros((len(rows), size, size), np.uint8),) * 2)
    calls = []
    monkeypatch.setattr(L, "train", fake_train(calls))
    return calls


def test_without_checkpoint_a_gpu_trains_chapter_03s_recipe_and_says_so(no_checkpoint, monkeypatch, real_data_dir, capsys):
    monkeypatch.setattr(L, "pick_device", lambda preferred=None: torch.device("cuda"))
    model, said = L.load_chapter_model(real_data_dir)
    call = no_checkpoint[0]
    assert call["run_dir"] == L.CHAPTER_RUN_DIR and call["n_train"] == 492
    assert (call["config"].image_size, call["config"].epochs, call["config"].weights, call["config"].lr) == (256, 20, None, 1e-3)
    assert "training chapter 03's recipe on this GPU now" in capsys.readouterr().out
    assert "trained just now by this chapter" in said


def test_without_checkpoint_a_cpu_shows_a_banner_and_trains_the_quick_model(no_checkpoint, monkeypatch, real_data_dir, capsys):
    monkeypatch.setattr(L, "pick_device", lambda preferred=None: torch.device("cpu"))
    model, said = L.load_chapter_model(real_data_dir)
    call = no_checkpoint[0]
    assert (call["config"].image_size, call["config"].epochs) == (128, 2) and call["n_train"] < 100
    out = capsys.readouterr().out
    assert "NO TRAINED MODEL FOUND" in out and "NOT the stored ones" in out and "run chapter 03" in out
    assert said.startswith("quick-mode model trained just now")


def test_a_checkpoint_in_google_drive_is_found(no_checkpoint, small_checkpoint, monkeypatch):
    import shutil

    L.DRIVE_CHECKPOINT.parent.mkdir(parents=True)
    shutil.copy(small_checkpoint, L.DRIVE_CHECKPOINT)
    assert L.find_checkpoint() == L.DRIVE_CHECKPOINT
    model, said = L.load_chapter_model()
    assert said.startswith("checkpoint drive/best.pt") and not no_checkpoint, "nothing is trained"


def test_the_default_config_is_chapter_03s_recipe():
    config = L.TrainConfig()
    assert (config.weights, config.lr, config.schedule, config.epochs, config.image_size, config.batch_size, config.patience) == (
        None, 1e-3, "onecycle", 20, 256, 8, 5)
    assert config.equalize is True, "contrast normalisation on every image: the recipe confirmed at full size"


@pytest.mark.parametrize("flags, native", [("fpu avx avx2", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True)])
def test_cpu_bf16_only_where_native(tmp_path, monkeypatch, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert L.cpu_has_native_bf16(cpuinfo) is native
    monkeypatch.setattr(L, "cpu_has_native_bf16", lambda: native)
    assert L.autocast_dtype(torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert L.autocast_dtype(torch.device("mps")) is None


def test_missing_cpuinfo_means_fp32(tmp_path):
    assert L.cpu_has_native_bf16(tmp_path / "no-such-file") is False


def test_print_config_names_versions_and_device(capsys):
    L.print_config(torch.device("cpu"))
    out = capsys.readouterr().out
    for part in (f"torch {torch.__version__}", f"segmentation_models_pytorch {smp.__version__}", "albumentations ", "numpy ", "python ", "device: cpu"):
        assert part in out, part


def test_loss_weights_in_the_config_reach_the_training_loss(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    both = L.train(data, val, tmp_path / "both", tiny_config(epochs=1))
    bce_only = L.train(data, val, tmp_path / "bce", tiny_config(epochs=1, dice_weight=0.0))
    # Same seed and data: the first epoch differs only by the Dice term, which is positive here.
    assert bce_only.history.val_loss[0] < both.history.val_loss[0]
    stored = L.read_checkpoint(tmp_path / "bce" / "best.pt")["config"]
    assert stored["dice_weight"] == 0.0 and stored["bce_weight"] == 1.0


def test_error_legend_names_the_overlay_colours():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    L.error_legend(figure)
    legend = figure.legends[0]
    labels = [text.get_text() for text in legend.get_texts()]
    colours = [tuple(np.round(np.array(h.get_facecolor()[:3]) * 255).astype(int)) for h in legend.legend_handles]
    plt.close(figure)
    assert labels == list(L.ERROR_COLOURS) and colours == [tuple(c) for c in L.ERROR_COLOURS.values()]


def test_cpu_model_name_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9999 16-Core Processor\nflags\t\t: avx2\n")
    assert L.cpu_model_name(cpuinfo) == "AMD EPYC 9999 16-Core Processor"
    assert L.cpu_model_name(tmp_path / "missing")  # falls back to what platform knows


def test_paired_difference_sees_a_small_consistent_gain_that_separate_intervals_hide():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.85, 0.99, 60)  # images differ a lot from each other ...
    candidate = reference + 0.004 + rng.normal(0, 0.002, 60)  # ... the candidate adds a little to each
    paired = L.paired_difference(candidate, reference)
    assert 0 < paired["ci_low"] < 0.004 < paired["ci_high"] < 0.006 and paired["wins"] > 0.9
    separate = L.summarize_scores(candidate), L.summarize_scores(reference)
    assert separate[0]["ci_low"] < separate[1]["ci_high"]  # the separate intervals overlap all the same
    assert L.paired_difference(reference, reference)["ci_low"] == 0.0  # no difference, no spread


def test_paired_difference_needs_the_same_images_and_counts_undefined_scores():
    with pytest.raises(L.LungsegDataError, match="same images"):
        L.paired_difference([0.9, 0.8], [0.9])
    result = L.paired_difference([1.0, np.nan, 3.0, 5.0], [0.0, 1.0, 1.0, 2.0])
    assert result["n"] == 3 and result["missing"] == 1 and result["mean_difference"] == pytest.approx(2.0)


def test_paired_interval_has_its_nominal_coverage():
    rng = np.random.default_rng(2)
    hits = 0
    for trial in range(200):
        reference = rng.uniform(0.8, 1.0, 40)
        candidate = reference + rng.exponential(0.01, 40) - 0.01  # true mean difference 0, skewed
        result = L.paired_difference(candidate, reference, n_bootstrap=1000, seed=trial)
        hits += result["ci_low"] <= 0 <= result["ci_high"]
    assert 0.88 <= hits / 200 <= 0.985


def test_learning_rate_schedule_rises_to_its_peak_then_decays():
    config = L.TrainConfig(lr=1e-3, epochs=10, schedule="onecycle")
    rates = L.learning_rate_schedule(config, steps_per_epoch=20)
    assert len(rates) == 200 and rates.max() == pytest.approx(1e-3)
    assert 50 <= rates.argmax() <= 70  # a warm-up over about 30% of the steps
    assert rates[0] < 1e-4 and rates[-1] < 1e-6
    constant = L.learning_rate_schedule(L.TrainConfig(lr=1e-4, epochs=2, schedule="constant"), 5)
    assert (constant == 1e-4).all()


def test_imagenet_availability_follows_cache_and_hub(monkeypatch):
    monkeypatch.setattr(lungseg_io, "cached_imagenet_state", lambda encoder: None)
    monkeypatch.setattr(lungseg_io, "hub_reachable", lambda: False)
    assert L.imagenet_weights_available() is False
    monkeypatch.setattr(lungseg_io, "hub_reachable", lambda: True)
    assert L.imagenet_weights_available() is True


def test_error_zones_are_disjoint_rates_that_find_the_wrong_place():
    truth = np.zeros((200, 200), np.uint8)
    truth[40:160, 30:90] = 1  # patient's right lung (image left)
    truth[40:160, 110:170] = 1  # left lung
    assert all(v == 0 for v in L.error_zones(truth, truth).values())
    missed_heart_side = truth.copy()
    missed_heart_side[110:135, 110:118] = 0  # lower inner edge of the left lung, where the heart border is
    zones = L.error_zones(missed_heart_side, truth)
    assert max(L.ERROR_ZONES, key=zones.get) == "heart border" and zones["far from the outline"] == 0
    island = truth.copy()
    island[5:15, 95:105] = 1  # a stray island far from both lungs
    assert L.error_zones(island, truth)["far from the outline"] > 0
    # A large zone does not win by its size: the same number of wrong pixels in the small apex strip
    # gives a higher rate there than along the long rest of the outline.
    apex_error, side_error = truth.copy(), truth.copy()
    apex_error[40:44, 40:80] = 0
    side_error[70:110, 30:34] = 0
    assert L.error_zones(apex_error, truth)["apices"] > L.error_zones(side_error, truth)["rest of the outline"]


def test_equalized_model_sees_clahe_in_training_and_prediction(random_model, tmp_path):
    """equalize=True: the dataset and predict_arrays give the model the CLAHE image, and the checkpoint says so."""
    image, mask = textured_image(), np.zeros((64, 64), np.uint8)
    equalized = L.equalize_contrast(image)
    assert not np.array_equal(equalized, image)
    tensor, _ = L.LungDataset(image[None], mask[None], equalize=True)[0]
    assert torch.equal(tensor, L.image_to_tensor(equalized))
    plain = L.predict_arrays(random_model, equalized[None])
    random_model.lungseg_config["equalize"] = True
    try:
        assert np.array_equal(L.predict_arrays(random_model, image[None]), plain)
    finally:
        random_model.lungseg_config.pop("equalize")
    assert not np.array_equal(L.predict_arrays(random_model, image[None]), plain), "the check must be able to fail"
    result = L.train(tiny_arrays(4), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(epochs=1, equalize=True))
    assert result.model.lungseg_config["equalize"] is True
    assert "every input equalised with CLAHE" in L.describe_model(result.model, tmp_path / "run" / "best.pt")

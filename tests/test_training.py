"""Training: the run folder, resume after an interruption, early stopping, the GradScaler's state, checks of the
config and the arrays, the workers' augmentation streams, the loss weights, the learning-rate schedule, the moving
average of the weights and UNet++."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import lungseg_utils as L
from conftest import lung_mask, naming, tiny_arrays, tiny_config


# ---------------------------------------------------------------- a run and its resume
def test_train_writes_run_and_refuses_to_overwrite(tmp_path):
    run = tmp_path / "first-run"
    result = L.train(tiny_arrays(8), tiny_arrays(4, seed=1), run, tiny_config(epochs=2))
    for name in ("best.pt", "last.pt", "history.csv", "curves.png"):
        assert (run / name).is_file()
    history = pd.read_csv(run / "history.csv")
    assert list(history.epoch) == [1, 2] and (history.train_images_per_s > 0).all()
    assert result.best_epoch in (1, 2) and result.best_val_loss == history.val_loss.min()
    written = {path.name: path.stat().st_mtime_ns for path in run.iterdir()}
    with pytest.raises(L.LungsegConfigError, match=naming(run, "resume=True")):
        L.train(tiny_arrays(8), tiny_arrays(4, seed=1), run, tiny_config(epochs=2))
    assert {path.name: path.stat().st_mtime_ns for path in run.iterdir()} == written, "the run is left as it was"


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
    with pytest.raises(L.LungsegConfigError, match=naming(os.path.join("never-started", "last.pt"), "Nothing to resume")):
        L.train(tiny_arrays(8), tiny_arrays(4), tmp_path / "never-started", tiny_config(), resume=True)


def test_resume_refuses_a_changed_config_naming_the_fields(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    L.train(data, val, tmp_path / "run", tiny_config(epochs=1))
    with pytest.raises(L.LungsegConfigError, match=naming(os.path.join("run", "last.pt"), "epochs", "lr")) as error:
        L.train(data, val, tmp_path / "run", tiny_config(epochs=2, lr=1e-2), resume=True)
    assert "batch_size" not in str(error.value), "only the fields that differ are named"
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


# ---------------------------------------------------------------- checks of the config and the data
def test_train_checks_image_size_against_config(tmp_path):
    with pytest.raises(L.LungsegDataError, match=naming("image_size=128")):
        L.train(tiny_arrays(8), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(image_size=128))
    assert not (tmp_path / "run").exists(), "nothing is written for a run that cannot start"


def test_train_with_path_and_numpy_values_in_config_reloads_its_best_model(tmp_path, random_model):
    """A Path or a NumPy number in the config must not break the checkpoint (weights_only=True refuses them)."""
    save_file({k: v.contiguous() for k, v in random_model.encoder.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    config = tiny_config(epochs=1, lr=np.float64(1e-3), rotate_limit=np.float32(20), weights=tmp_path / "encoder.safetensors")
    result = L.train(tiny_arrays(8), tiny_arrays(4, seed=1), tmp_path / "run", config)
    stored = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["config"]
    assert stored["weights"] == str(tmp_path / "encoder.safetensors")
    assert type(stored["lr"]) is float and type(stored["rotate_limit"]) is float
    assert result.model.lungseg_config["lr"] == pytest.approx(1e-3)


def test_the_default_config_is_chapter_03s_recipe():
    config = L.TrainConfig()
    assert (config.weights, config.lr, config.schedule, config.epochs, config.image_size, config.batch_size, config.patience) == (
        None, 1e-3, "onecycle", 20, 256, 8, 5)
    assert config.equalize is True, "contrast normalisation on every image: the recipe confirmed at full size"


# ---------------------------------------------------------------- what reaches the training
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


def test_loss_weights_in_the_config_reach_the_training_loss(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    both = L.train(data, val, tmp_path / "both", tiny_config(epochs=1))
    bce_only = L.train(data, val, tmp_path / "bce", tiny_config(epochs=1, dice_weight=0.0))
    # Same seed and data: the first epoch differs only by the Dice term, which is positive here.
    assert bce_only.history.val_loss[0] < both.history.val_loss[0]
    stored = L.read_checkpoint(tmp_path / "bce" / "best.pt")["config"]
    assert stored["dice_weight"] == 0.0 and stored["bce_weight"] == 1.0


def test_learning_rate_schedule_rises_to_its_peak_then_decays():
    config = L.TrainConfig(lr=1e-3, epochs=10, schedule="onecycle")
    rates = L.learning_rate_schedule(config, steps_per_epoch=20)
    assert len(rates) == 200 and rates.max() == pytest.approx(1e-3)
    assert 50 <= rates.argmax() <= 70  # a warm-up over about 30% of the steps
    assert rates[0] < 1e-4 and rates[-1] < 1e-6
    constant = L.learning_rate_schedule(L.TrainConfig(lr=1e-4, epochs=2, schedule="constant"), 5)
    assert (constant == 1e-4).all()


def test_resume_refuses_a_file_that_is_not_a_last_pt(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    L.train(data, val, tmp_path / "run", tiny_config(epochs=1))
    (tmp_path / "run" / "last.pt").write_bytes((tmp_path / "run" / "best.pt").read_bytes())  # best.pt copied over last.pt
    with pytest.raises(L.LungsegCheckpointError, match="last.pt.*optimizer_state"):
        L.train(data, val, tmp_path / "run", tiny_config(epochs=2), resume=True)


def test_resume_refuses_a_last_pt_of_another_version_naming_what_it_lacks(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    L.train(data, val, tmp_path / "run", tiny_config(epochs=1))
    last = tmp_path / "run" / "last.pt"
    payload = torch.load(last, weights_only=True)
    del payload["config"]["equalize"]  # as a version without that field wrote it
    torch.save(payload, last)
    with pytest.raises(L.LungsegCheckpointError, match=naming(last, "equalize")):
        L.train(data, val, tmp_path / "run", tiny_config(epochs=2), resume=True)


def test_run_epoch_trains_without_scoring_and_evaluates_with_dice():
    images, masks = tiny_arrays(8)
    model = L.build_model("resnet18", weights=None)
    loader = torch.utils.data.DataLoader(L.LungDataset(images, masks), batch_size=4)
    steps = dict(loss_fn=L.DiceBCELoss(), device=torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    trained = L.run_epoch(model, loader, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), **steps)
    assert set(trained) == {"loss"} and trained["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "a training epoch moves the weights"
    after = [p.detach().clone() for p in model.parameters()]
    evaluated = L.run_epoch(model, loader, **steps)
    assert set(evaluated) == {"loss", "dice"} and 0 <= evaluated["dice"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(after, model.parameters())), "evaluation leaves the weights alone"
    with pytest.raises(TypeError):
        L.run_epoch(model, loader, L.DiceBCELoss(), torch.device("cpu"))  # keyword arguments only


# ---------------------------------------------------------------- the full-model screen's levers
def test_moving_average_is_what_best_pt_keeps_and_a_resume_restores(tmp_path):
    data, val = tiny_arrays(8), tiny_arrays(4, seed=1)
    config = tiny_config(epochs=2, ema_decay=0.5)
    full = L.train(data, val, tmp_path / "full", config)
    last = L.read_checkpoint(tmp_path / "full" / "last.pt")
    assert last["average_state"]["n_averaged"] == 4  # 8 images in batches of 4, two epochs: one update per step
    weight = "encoder.conv1.weight"
    assert not torch.equal(last["average_state"][f"module.{weight}"], last["model_state"][weight]), "an average, not the last weights"

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L.train(data, val, tmp_path / "cut", config, on_epoch_end=interrupt)
    after_one = L.read_checkpoint(tmp_path / "cut" / "last.pt")["average_state"]
    best_after_one = L.read_checkpoint(tmp_path / "cut" / "best.pt")["model_state"]  # epoch 1 is always the best so far
    torch.testing.assert_close(best_after_one[weight], after_one[f"module.{weight}"])
    resumed = L.train(data, val, tmp_path / "cut", config, resume=True)
    np.testing.assert_allclose(resumed.history.val_loss, full.history.val_loss, rtol=1e-4)
    resumed_average = L.read_checkpoint(tmp_path / "cut" / "last.pt")["average_state"]
    torch.testing.assert_close(resumed_average[f"module.{weight}"], last["average_state"][f"module.{weight}"], rtol=1e-4, atol=1e-5)


def test_unetplusplus_trains_and_its_checkpoint_rebuilds_it(tmp_path):
    result = L.train(tiny_arrays(8), tiny_arrays(4, seed=1), tmp_path / "run", tiny_config(epochs=1, architecture="unetplusplus"))
    reloaded = L.load_checkpoint(tmp_path / "run" / "best.pt")
    assert type(result.model).__name__ == type(reloaded).__name__ == "UnetPlusPlus"
    batch = torch.from_numpy(tiny_arrays(2)[0]).float()[:, None].repeat(1, 3, 1, 1) / 255
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), result.model.cpu().eval()(batch))
    with pytest.raises(L.LungsegConfigError, match="unet, unetplusplus"):
        L.build_model("resnet18", None, architecture="segformer")

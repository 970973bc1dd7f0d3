"""Data location, pairing, reading, bad input, splits and the cache."""
from __future__ import annotations

import os
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

import lungseg_utils as L
from conftest import lung_mask, naming, write_kaggle_layout


# ---------------------------------------------------------------- location
def test_find_data_dir_accepts_parent_and_folder_itself(tmp_path):
    base = write_kaggle_layout(tmp_path)
    assert L.find_data_dir(tmp_path) == base
    assert L.find_data_dir(base) == base


def test_find_data_dir_uses_environment_variable(tmp_path, monkeypatch):
    base = write_kaggle_layout(tmp_path)
    monkeypatch.setenv("LUNGSEG_DATA_DIR", str(tmp_path))
    assert L.find_data_dir() == base


def test_missing_data_folder_says_how_to_get_data(tmp_path):
    with pytest.raises(L.LungsegDataError, match=naming("nowhere", "lungseg_utils.py download")):
        L.find_data_dir(tmp_path / "nowhere")


def test_empty_data_folder_says_how_to_get_data(tmp_path):
    (tmp_path / "Lung Segmentation" / "CXR_png").mkdir(parents=True)
    with pytest.raises(L.LungsegDataError, match=naming(tmp_path, "LUNGSEG_DATA_DIR")):
        L.find_data_dir(tmp_path)


# ---------------------------------------------------------------- pairing
def test_pairs_table_on_real_data(real_data_dir):
    """Whatever the real data (both hospitals or Montgomery alone): every image and mask is found and paired."""
    table = L.build_pairs_table(real_data_dir)
    images = real_data_dir / "CXR_png"
    assert len(table) == len(list(images.glob("*.png"))) and table.labeled.any()
    labeled = table[table.labeled]
    assert all(Path(row.mask_paths[0]).stem.removesuffix("_mask") == row.name for row in labeled.itertuples())
    assert set(table.tb_label) == {0, 1}
    assert (table.height > 0).all() and (table.width > 0).all()


def test_pairs_table_on_the_kaggle_set(kaggle_data_dir):
    """The Kaggle set's own counts: 800 X-rays, 704 with masks, the unlabeled ones all from Shenzhen."""
    table = L.build_pairs_table(kaggle_data_dir)
    assert len(table) == 800
    assert table["labeled"].sum() == 704
    counts = table[table.labeled].groupby("source").size().to_dict()
    assert counts == {"Montgomery": 138, "Shenzhen": 566}
    unlabeled = table[~table.labeled]
    assert len(unlabeled) == 96 and set(unlabeled.source) == {"Shenzhen"}
    inventory = table.groupby(["source", "tb_label", "labeled"]).size().to_dict()  # chapter 01's table
    assert inventory == {("Montgomery", 0, True): 80, ("Montgomery", 1, True): 58, ("Shenzhen", 0, False): 47,
                         ("Shenzhen", 0, True): 279, ("Shenzhen", 1, False): 49, ("Shenzhen", 1, True): 287}
    row = table.set_index("name").loc["CHNCXR_0001_0"]
    assert row.mask_paths[0].endswith("CHNCXR_0001_0_mask.png") and row.tb_label == 0
    row = table.set_index("name").loc["MCUCXR_0001_0"]
    assert Path(row.mask_paths[0]).name == "MCUCXR_0001_0.png"


def test_pairs_table_both_naming_conventions(tmp_path):
    write_kaggle_layout(tmp_path, n=3)
    table = L.build_pairs_table(tmp_path)
    assert len(table) == 7 and table.labeled.sum() == 6
    assert table.set_index("name").loc["CHNCXR_9999_1", "mask_paths"] == ()
    assert list(L.labeled_only(table).name) == sorted(L.labeled_only(table).name)


def test_nlm_left_right_masks_are_combined(tmp_path):
    root = tmp_path / "MontgomerySet"
    for sub in ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask"):
        (root / sub).mkdir(parents=True)
    both = lung_mask(64)
    left, right = both.copy(), both.copy()
    left[:, 32:], right[:, :32] = 0, 0
    cv2.imwrite(str(root / "CXR_png/MCUCXR_0001_0.png"), np.full((64, 64), 90, np.uint8))
    cv2.imwrite(str(root / "ManualMask/leftMask/MCUCXR_0001_0.png"), left)
    cv2.imwrite(str(root / "ManualMask/rightMask/MCUCXR_0001_0.png"), right)
    table = L.build_pairs_table(tmp_path)
    assert len(table.loc[0, "mask_paths"]) == 2 and table.loc[0, "source"] == "Montgomery"
    _, mask = L.read_pair(table.loc[0, "image_path"], table.loc[0, "mask_paths"])
    np.testing.assert_array_equal(mask, both // 255)


def test_mask_without_image_is_named(tmp_path):
    base = write_kaggle_layout(tmp_path)
    os.remove(base / "CXR_png" / "MCUCXR_0001_1.png")
    with pytest.raises(L.LungsegDataError, match=naming("MCUCXR_0001_1.png", "without an image")):
        L.build_pairs_table(tmp_path)


def test_image_without_mask_cannot_be_used_for_training(tmp_path):
    write_kaggle_layout(tmp_path)
    table = L.build_pairs_table(tmp_path)
    unlabeled = table[~table.labeled]
    with pytest.raises(L.LungsegDataError, match="unlabeled"):
        L.read_mask(unlabeled.iloc[0].mask_paths)
    images, masks = L.load_arrays(unlabeled, 32)
    assert images.shape == (1, 32, 32) and masks is None
    with pytest.raises(L.LungsegDataError, match="one mask per image"):
        L.LungDataset(images, masks)


# ---------------------------------------------------------------- bad files
def test_mask_of_another_size_is_named(tmp_path):
    base = write_kaggle_layout(tmp_path)
    cv2.imwrite(str(base / "masks" / "CHNCXR_0000_0_mask.png"), lung_mask(96))
    table = L.build_pairs_table(tmp_path).set_index("name")
    row = table.loc["CHNCXR_0000_0"]
    with pytest.raises(L.LungsegDataError, match=naming("CHNCXR_0000_0.png", "CHNCXR_0000_0_mask.png", "96x96")):
        L.read_pair(row.image_path, row.mask_paths)


def test_corrupt_png_is_named(tmp_path):
    base = write_kaggle_layout(tmp_path)
    bad = base / "CXR_png" / "MCUCXR_0000_0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(L.LungsegDataError, match=naming(bad, "cannot be read")):
        L.build_pairs_table(tmp_path)
    with pytest.raises(L.LungsegDataError, match=naming(bad, "cannot be read")):
        L.decode_image(bad)


def test_16bit_and_rgba_masks_are_refused_with_the_file_named(tmp_path):
    sixteen = tmp_path / "m16.png"
    cv2.imwrite(str(sixteen), lung_mask().astype(np.uint16) * 257)
    with pytest.raises(L.LungsegDataError, match=naming(sixteen, "uint16")):
        L.read_mask([sixteen])
    rgba = tmp_path / "mrgba.png"
    cv2.imwrite(str(rgba), np.dstack([lung_mask()] * 3 + [np.full((64, 64), 255, np.uint8)]))
    with pytest.raises(L.LungsegDataError, match=naming(rgba, "4 channels")):
        L.read_mask([rgba])


def test_16bit_and_rgba_images_become_8bit_gray(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint16) * 1000, (64, 1))
    cv2.imwrite(str(tmp_path / "x16.png"), gray)
    image = L.decode_image(tmp_path / "x16.png")
    assert image.dtype == np.uint8 and image.shape == (64, 64) and image.min() == 0 and image.max() == 255
    rgba = np.dstack([np.full((40, 50), 100, np.uint8)] * 3 + [np.zeros((40, 50), np.uint8)])
    cv2.imwrite(str(tmp_path / "xrgba.png"), rgba)
    image = L.decode_image(tmp_path / "xrgba.png")
    assert image.shape == (40, 50) and (image == 100).all()


def test_resize_mask_stays_binary():
    mask = lung_mask(512) // 255
    small = L.resize_mask(mask, 256)
    assert set(np.unique(small)) == {0, 1}
    assert abs(small.mean() - mask.mean()) < 0.01
    assert L.resize_mask(small, (300, 200)).shape == (300, 200)


# ---------------------------------------------------------------- splits
def test_writeup_split_is_80_20_disjoint_and_independent_of_listing_order(real_data_dir):
    table = L.build_pairs_table(real_data_dir)
    train, val = L.writeup_split(table)
    assert len(train) + len(val) == table.labeled.sum() and len(val) == pytest.approx(0.2 * table.labeled.sum(), abs=1)
    again_train, _ = L.writeup_split(table.sample(frac=1, random_state=1))
    assert list(train.name) == list(again_train.name), "split must not depend on listing order"
    L.assert_disjoint({"train": train, "val": val})


def test_writeup_split_is_the_writeups(kaggle_data_dir):
    """The write-up's split of the Kaggle set: 563 training and 141 validation X-rays."""
    train, val = L.writeup_split(L.build_pairs_table(kaggle_data_dir))
    assert (len(train), len(val)) == (563, 141)


def test_the_kaggle_set_splits_as_the_chapters_print(kaggle_data_dir):
    """Chapters 01, 03 and 04 print these parts of the Kaggle set: each split's size per hospital and TB label."""
    table = L.build_pairs_table(kaggle_data_dir, read_sizes=False)
    writeup_train, writeup_val = L.writeup_split(table)
    parts = {"write-up train": writeup_train, "write-up val": writeup_val, **L.three_way_split(table)}
    composition = {name: part.groupby(["source", "tb_label"]).size().to_dict() for name, part in parts.items()}
    assert composition == {
        "write-up train": {("Montgomery", 1): 47, ("Montgomery", 0): 71, ("Shenzhen", 1): 232, ("Shenzhen", 0): 213},
        "write-up val": {("Montgomery", 1): 11, ("Montgomery", 0): 9, ("Shenzhen", 1): 55, ("Shenzhen", 0): 66},
        "train": {("Montgomery", 1): 40, ("Montgomery", 0): 56, ("Shenzhen", 1): 201, ("Shenzhen", 0): 195},
        "val": {("Montgomery", 1): 6, ("Montgomery", 0): 8, ("Shenzhen", 1): 29, ("Shenzhen", 0): 28},
        "test": {("Montgomery", 1): 12, ("Montgomery", 0): 16, ("Shenzhen", 1): 57, ("Shenzhen", 0): 56},
    }
    assert len(set(writeup_val.name) & set(parts["test"].name)) == 24


def test_three_way_split_is_stratified_disjoint_and_deterministic(real_data_dir):
    table = L.build_pairs_table(real_data_dir)
    split = L.three_way_split(table)
    labeled = table[table.labeled]
    assert sum(len(v) for v in split.values()) == len(labeled)
    L.assert_disjoint(split)
    for part in split.values():
        share = (part.source == "Montgomery").mean()
        assert abs(share - (labeled.source == "Montgomery").mean()) < 0.03  # 138 of 704 in the Kaggle set
        assert part.labeled.all()
    again = L.three_way_split(table.sample(frac=1, random_state=3))
    assert all(list(split[k].name) == list(again[k].name) for k in split)


def test_assert_disjoint_catches_overlap(real_data_dir):
    table = L.labeled_only(L.build_pairs_table(real_data_dir))
    with pytest.raises(L.LungsegDataError, match="in both a and b"):
        L.assert_disjoint({"a": table.iloc[:10], "b": table.iloc[5:15]})


def test_quick_subset_keeps_both_hospitals_and_both_tb_labels(real_data_dir):
    """Every (hospital, TB label) group of the data stays in every part: four groups in the Kaggle set, two in Montgomery's."""
    table = L.build_pairs_table(real_data_dir)
    groups = set(zip(*L.labeled_only(table)[["source", "tb_label"]].values.T))
    split = L.quick_subset(L.three_way_split(table), 80)
    assert 60 <= sum(len(v) for v in split.values()) <= 100
    for part in split.values():
        assert set(zip(part.source, part.tb_label)) == groups
    L.assert_disjoint(split)


# ---------------------------------------------------------------- cache
def test_cache_is_written_outside_repo_and_reused(tmp_path, real_data_dir):
    rows = L.labeled_only(L.build_pairs_table(real_data_dir)).iloc[:3]
    images, masks = L.load_arrays(rows, 64, cache_dir=tmp_path)
    assert images.shape == (3, 64, 64) and masks.shape == (3, 64, 64)
    assert set(np.unique(masks)) == {0, 1}
    files = sorted((tmp_path / "64px").glob("*.npy"))
    assert len(files) == 3
    stamps = [f.stat().st_mtime_ns for f in files]
    again, _ = L.load_arrays(rows, 64, cache_dir=tmp_path)
    np.testing.assert_array_equal(images, again)
    assert [f.stat().st_mtime_ns for f in files] == stamps, "a cached sample was decoded again"


def test_cache_rebuilds_when_source_changes(tmp_path):
    write_kaggle_layout(tmp_path / "data")
    table = L.build_pairs_table(tmp_path / "data")
    row = L.labeled_only(table).iloc[0]
    before, _ = L.cached_sample(row.image_path, row.mask_paths, 32, tmp_path / "cache")
    time.sleep(0.01)
    cv2.imwrite(row.image_path, np.full((64, 64), 200, np.uint8))
    after, _ = L.cached_sample(row.image_path, row.mask_paths, 32, tmp_path / "cache")
    assert (after == 200).all() and not (before == 200).all()


def test_default_cache_dir_is_outside_repo(monkeypatch):
    monkeypatch.delenv("LUNGSEG_CACHE_DIR")
    assert not L.default_cache_dir().resolve().is_relative_to(L.REPO_DIR)


# ---------------------------------------------------------------- dataset
def test_dataset_tensors_and_normalization():
    images = np.stack([np.full((64, 64), 255, np.uint8), np.zeros((64, 64), np.uint8)])
    masks = np.stack([lung_mask() // 255] * 2)
    L.check_arrays(images, masks)
    dataset = L.LungDataset(images, masks, L.train_transforms())
    image, mask = dataset[0]
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    plain_image, plain_mask = L.LungDataset(images, masks)[0]
    expected = (1 - np.array(L.IMAGENET_MEAN)) / np.array(L.IMAGENET_STD)
    np.testing.assert_allclose(plain_image[:, 0, 0].numpy(), expected, rtol=1e-5)
    assert set(plain_mask.unique().tolist()) == {0.0, 1.0}


def test_train_transforms_have_no_horizontal_flip():
    names = {type(t).__name__ for t in L.train_transforms().transforms}
    assert "HorizontalFlip" not in names and "Affine" in names


def test_check_arrays_rejects_bad_sizes_and_values():
    with pytest.raises(L.LungsegDataError, match="divisible by 32"):
        L.check_arrays(np.zeros((1, 50, 50), np.uint8), np.zeros((1, 50, 50), np.uint8))
    with pytest.raises(L.LungsegDataError, match="only 0 and 1"):
        L.check_arrays(np.zeros((1, 64, 64), np.uint8), np.full((1, 64, 64), 255, np.uint8))
    with pytest.raises(L.LungsegDataError, match="differ"):
        L.check_arrays(np.zeros((2, 64, 64), np.uint8), np.zeros((1, 64, 64), np.uint8))
    with pytest.raises(L.LungsegDataError, match=naming("image_size=128")):
        L.check_arrays(np.zeros((1, 64, 64), np.uint8), np.zeros((1, 64, 64), np.uint8), image_size=128)


def test_module_checks_do_not_rely_on_assert():
    """``python -O`` strips assert statements, so no check of the module may be one."""
    import ast

    for module in ("lungseg_utils.py", "lungseg_io.py"):
        tree = ast.parse((L.REPO_DIR / module).read_text())
        asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
        assert not asserts, f"assert statements at lines {asserts} of {module}"


def test_quick_mode_config(monkeypatch):
    monkeypatch.setenv("LUNGSEG_QUICK", "1")
    assert L.is_quick_mode() and L.TrainConfig.for_mode() == L.TrainConfig.quick()
    assert L.TrainConfig.quick().epochs <= 2 and L.TrainConfig.quick().max_images == 80
    monkeypatch.setenv("LUNGSEG_QUICK", "0")
    assert not L.is_quick_mode() and L.TrainConfig.for_mode(epochs=3) == L.TrainConfig(epochs=3)


def test_lung_areas_sides_follow_radiological_convention():
    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 5:25] = 1  # image left = patient's right lung, 800 px
    mask[10:40, 40:60] = 1  # image right = patient's left lung, 600 px
    mask[60:62, 60:62] = 1  # a speck on the image's right
    areas = L.lung_areas(mask)
    assert areas == {"components": 3, "right_lung_area": 800.0, "left_lung_area": 604.0}


def test_train_transforms_flip_and_clahe_are_explicit_choices():
    names = {type(t).__name__ for t in L.train_transforms(L.TrainConfig(horizontal_flip=True, clahe=True)).transforms}
    assert {"HorizontalFlip", "CLAHE", "Affine"} <= names
    image = np.tile(np.arange(64, dtype=np.uint8)[None] * 4, (64, 1))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :16] = 1
    flip_only = L.train_transforms(L.TrainConfig(
        rotate_limit=0, photometric=False, strong_photometric=False, clahe=False, opacity_p=0, horizontal_flip=True))
    flip_only.set_random_seed(0)
    flipped = [flip_only(image=image, mask=mask)["mask"][:, -16:].all() for _ in range(40)]
    assert 5 < sum(flipped) < 35  # about half of the masks moved to the other side, with their images


def test_anatomy_landmarks_on_two_drawn_lungs():
    mask = np.zeros((200, 200), np.uint8)
    cv2.ellipse(mask, (60, 100), (30, 70), 0, 0, 360, 1, -1)  # patient's right lung (image left), larger
    cv2.ellipse(mask, (140, 110), (25, 60), 0, 0, 360, 1, -1)
    points = L.anatomy_landmarks(mask)
    assert points["right apex"][1] == pytest.approx(30, abs=1) and points["left apex"][1] == pytest.approx(50, abs=1)
    assert points["right apex"][0] == pytest.approx(60, abs=2) and points["left apex"][0] == pytest.approx(140, abs=2)
    assert points["right hemidiaphragm"] == pytest.approx((60, 170), abs=1)
    assert points["right costophrenic angle"][0] < 60 < points["right costophrenic angle"][1]
    assert points["left costophrenic angle"][0] > 140 and points["left costophrenic angle"][1] > 130
    assert 115 <= points["heart border"][0] < 140 and points["retrocardiac region"][1] > points["heart border"][1]
    assert points["retrocardiac region"][0] < points["heart border"][0] + 10  # in the heart shadow, not in the lung
    with pytest.raises(L.LungsegDataError, match="two lungs"):
        L.anatomy_landmarks(np.zeros((50, 50), np.uint8))


def test_simulated_opacity_whitens_inside_one_lung_and_keeps_the_mask():
    image = np.full((128, 128), 60, np.uint8)
    mask = np.zeros((128, 128), np.uint8)
    cv2.ellipse(mask, (35, 64), (20, 45), 0, 0, 360, 1, -1)
    cv2.ellipse(mask, (93, 64), (20, 45), 0, 0, 360, 1, -1)
    transform = A.Compose([L.SimulatedOpacity(p=1.0)])
    near_lung = cv2.dilate(mask, np.ones((15, 15), np.uint8)).astype(bool)  # the edge is softened over a few pixels
    outputs = []
    for seed in range(6):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert (out["mask"] == mask).all() and (out["image"] >= image).all()
        brighter = out["image"].astype(int) - image
        assert brighter.sum() > 0 and brighter[~near_lung].sum() == 0
        sides = [brighter[:, :64].sum() > 0, brighter[:, 64:].sum() > 0]
        assert sum(sides) == 1  # one lung only
        outputs.append(out["image"])
    transform.set_random_seed(3)
    assert (transform(image=image, mask=mask)["image"] == outputs[3]).all()  # repeatable by seed


def test_the_default_recipe_has_the_travel_augmentations_and_a_mild_recipe_has_none():
    steps = L.train_transforms(L.TrainConfig()).transforms
    names = {type(t).__name__ for t in steps}
    assert {"SimulatedOpacity", "GaussNoise", "ImageCompression", "OneOf", "CLAHE"} <= names
    affine = next(t for t in steps if type(t).__name__ == "Affine")
    assert affine.scale["x"] == (0.75, 1.2)
    assert L.train_transforms(L.TrainConfig()).to_dict() == L.train_transforms().to_dict()  # one recipe, one place
    mild = L.TrainConfig(clahe=False, strong_photometric=False, opacity_p=0.0, framing=False)
    first_steps = L.train_transforms(mild).transforms
    assert not {"SimulatedOpacity", "GaussNoise", "CLAHE"} & {type(t).__name__ for t in first_steps}
    assert next(t for t in first_steps if type(t).__name__ == "Affine").scale["x"] == (0.9, 1.1)


def test_fired_transforms_names_what_a_replay_applied_and_the_choice_of_a_one_of():
    always = A.ReplayCompose([A.RandomGamma(p=1.0), A.GaussNoise(p=0.0), A.OneOf([A.GaussianBlur(), A.Downscale()], p=1.0)])
    always.set_random_seed(0)
    image = lung_mask(64)
    fired = L.fired_transforms(always(image=image, mask=image // 255)["replay"])
    assert fired[0] == "RandomGamma" and "GaussNoise" not in fired
    assert len(fired) == 2 and fired[1] in ("GaussianBlur", "Downscale")
    recipe = A.ReplayCompose(L.train_transforms().transforms)  # the recipe's own steps, SimulatedOpacity included
    recipe.set_random_seed(0)
    draws = [L.fired_transforms(recipe(image=image, mask=image // 255)["replay"]) for _ in range(20)]
    assert {"Affine", "SimulatedOpacity"} <= {name for names in draws for name in names}

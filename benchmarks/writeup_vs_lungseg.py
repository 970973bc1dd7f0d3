"""Time the write-up's training pipeline against this project's, on the same images and steps.

    python benchmarks/writeup_vs_lungseg.py            # defaults: 40 images, 5 epochs, 3000 px stand-ins
    python benchmarks/writeup_vs_lungseg.py --help

The write-up's way: every ``__getitem__`` decodes the full-size PNG and resizes it, fp32,
default memory format. This project's way: decode and resize once into the cache,
bf16/fp16 autocast where supported, channels-last. Both train the same U-Net/ResNet34
(same initial weights, Adam 1e-4, DiceBCE, batch 8, rotation ±35°) for the same
number of steps; the project's time includes building its cache from scratch.

The shared development copy of the data is 512 px, so the script first writes
full-size stand-ins (upscaled copies, ``--full-size`` px) into a temporary folder:
decoding then costs what it costs on the real download. Nothing is written into
the repository.
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lungseg_utils as L  # noqa: E402


class WriteupDataset(Dataset):
    """The write-up's dataset: decode the full-size PNGs and resize them on every access."""

    def __init__(self, image_paths: list[str], mask_paths: list[str], size: int, augment: bool):
        self.image_paths, self.mask_paths, self.size = image_paths, mask_paths, size
        self.transform = L.A.Compose([L.A.Rotate(limit=35, p=0.5)]) if augment else None

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        image = cv2.resize(cv2.imread(self.image_paths[index], cv2.IMREAD_GRAYSCALE), (self.size, self.size))
        mask = cv2.resize(cv2.imread(self.mask_paths[index], cv2.IMREAD_GRAYSCALE), (self.size, self.size))
        mask = (mask > 127).astype(np.uint8)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return L.image_to_tensor(image), torch.from_numpy(mask).float().unsqueeze(0)


def write_stand_ins(rows, folder: Path, full_size: int) -> tuple[list[str], list[str]]:
    """Upscaled full-size copies of the images (cubic) and masks (nearest) as PNGs."""
    images, masks = [], []
    for row in rows.itertuples():
        image, mask = L.read_pair(row.image_path, row.mask_paths)
        images.append(str(folder / f"{row.name}.png"))
        masks.append(str(folder / f"{row.name}_mask.png"))
        cv2.imwrite(images[-1], cv2.resize(image, (full_size, full_size), interpolation=cv2.INTER_CUBIC))
        cv2.imwrite(masks[-1], cv2.resize(mask * 255, (full_size, full_size), interpolation=cv2.INTER_NEAREST))
    return images, masks


def train_steps(model, loader, device, amp_dtype, channels_last: bool, epochs: int) -> tuple[float, int]:
    """Train for ``epochs`` passes over ``loader``; returns (seconds, images seen)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = L.DiceBCELoss()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device).to(memory_format=memory_format).train()
    seen, started = 0, time.perf_counter()
    for _ in range(epochs):
        for images, masks in loader:
            images = images.to(device).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            loss = loss_fn(logits.float(), masks.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, seen


def per_image_dice(model, images: np.ndarray, masks: np.ndarray, device) -> float:
    """Mean per-image Dice of the model on held-out cached images."""
    model.to(memory_format=torch.contiguous_format)
    return float(L.dice_iou_per_image(L.predict_arrays(model, images, device=device) > 0.5, masks)[0].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40, help="training images (default 40)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over them (default 5)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--full-size", type=int, default=3000, help="stand-in size in px (default 3000)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    device = L.pick_device()
    split = L.three_way_split(L.build_pairs_table(args.data_dir))
    train_rows = split["train"].groupby("source").head(args.images // 2).head(args.images)
    val_images, val_masks = L.load_arrays(split["val"].head(16), args.size)
    print(f"device {device}, {torch.get_num_threads()} CPU threads; {len(train_rows)} images, {args.epochs} epochs, "
          f"batch 8, {args.size}px, stand-ins {args.full_size}x{args.full_size}")

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "png").mkdir()
        image_paths, mask_paths = write_stand_ins(train_rows, work / "png", args.full_size)
        train_rows = train_rows.assign(image_path=image_paths, mask_paths=[(m,) for m in mask_paths])

        L.seed_everything(0)
        writeup_model = L.build_model("resnet34", weights=None)
        project_model = L.build_model("resnet34", weights=None)
        project_model.load_state_dict(writeup_model.state_dict())

        torch.manual_seed(0)
        writeup_loader = DataLoader(WriteupDataset(image_paths, mask_paths, args.size, augment=True), batch_size=8, shuffle=True)
        writeup_seconds, seen = train_steps(writeup_model, writeup_loader, device, None, channels_last=False, epochs=args.epochs)

        torch.manual_seed(0)
        started = time.perf_counter()
        arrays = L.load_arrays(train_rows, args.size, cache_dir=work / "cache")
        cache_seconds = time.perf_counter() - started
        project_loader = DataLoader(L.LungDataset(*arrays, L.train_transforms()), batch_size=8, shuffle=True)
        amp_dtype = L.autocast_dtype(device)
        train_seconds, seen_project = train_steps(project_model, project_loader, device, amp_dtype, channels_last=True, epochs=args.epochs)
        project_seconds = cache_seconds + train_seconds
        assert seen == seen_project

    writeup_rate, project_rate = seen / writeup_seconds, seen / project_seconds
    print(f"write-up pipeline (decode every time, fp32):             {writeup_seconds:7.1f} s  {writeup_rate:6.1f} img/s")
    print(f"lungseg pipeline (cache {cache_seconds:.1f} s + {amp_dtype or 'fp32'}, channels-last): "
          f"{project_seconds:7.1f} s  {project_rate:6.1f} img/s")
    print(f"speed-up end to end: {project_rate / writeup_rate:.1f}x "
          f"(training steps alone: {writeup_seconds / train_seconds:.1f}x)")
    print(f"held-out per-image Dice after these {args.epochs} epochs: write-up {per_image_dice(writeup_model, val_images, val_masks, device):.3f}, "
          f"lungseg {per_image_dice(project_model, val_images, val_masks, device):.3f} (16 validation images; short training, noisy)")


if __name__ == "__main__":
    main()

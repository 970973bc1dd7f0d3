"""Screen a fast-lane recipe: chapter 03's recipe with a lighter encoder, a smaller image and fewer epochs.

Usage: python benchmarks/fast_lane.py --encoder resnet18 --size 160 --epochs 12 --fp32 --out runs/fast-r18-160
Trains on the same split and augmentation as chapter 03, prints each epoch, the validation score, the
training FLOPs per image (forward and backward, torch's FlopCounterMode) and the wall time. The test
part is scored only with --test, for the confirmation of the recipe chosen on validation;
--score runs/<run>/best.pt scores a finished run on validation and test, at its size and at the
original 512 px, per hospital.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lungseg_utils as L  # noqa: E402


def training_gflop(encoder: str, size: int) -> float:
    """Forward and backward FLOPs of one training image, in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    model = L.build_model(encoder, None)
    with FlopCounterMode(display=False) as counter:
        model(L.torch.randn(1, 3, size, size)).sum().backward()
    return counter.get_total_flops() / 1e9


def score_checkpoint(checkpoint: str) -> None:
    """Print a trained run's validation and test Dice, at its own size and at the original size."""
    model = L.load_checkpoint(checkpoint)
    size = L.model_image_size(model)
    split = L.three_way_split(L.build_pairs_table())
    for part in ("val", "test"):
        scores = L.evaluate(model, split[part], size, original_resolution=True)[0]
        print(f"{part}: per-image Dice {scores['dice'].mean():.4f} at {size}px, "
              f"{scores['dice_orig'].mean():.4f} at the original size (n={len(scores)})")
        if part == "test":
            print(scores.groupby("source")[["dice", "dice_orig"]].mean().round(4).to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--fp32", action="store_true", help="no mixed precision (a CPU without native bf16)")
    parser.add_argument("--out")
    parser.add_argument("--test", action="store_true")
    parser.add_argument("--score", metavar="CHECKPOINT", help="only score a finished run")
    args = parser.parse_args()
    if args.score:
        return score_checkpoint(args.score)
    if not args.out:
        parser.error("--out is required to train")
    config = replace(L.TrainConfig.for_mode(), encoder=args.encoder, image_size=args.size, epochs=args.epochs,
                     mixed_precision=not args.fp32)
    gflop = training_gflop(args.encoder, args.size)
    split = L.three_way_split(L.build_pairs_table())
    arrays = {part: L.load_arrays(split[part], args.size) for part in ("train", "val")}
    started = time.perf_counter()
    result = L.train(arrays["train"], arrays["val"], args.out, config)
    wall = time.perf_counter() - started
    print(f"{args.encoder} at {args.size}px, {args.epochs} epochs, {'fp32' if args.fp32 else 'native precision'}: "
          f"{gflop:.1f} GFLOP per training image, wall {wall / 60:.1f} min, best epoch {result.best_epoch}, "
          f"{result.history.train_images_per_s.mean():.1f} train img/s = {gflop * result.history.train_images_per_s.mean():.0f} GFLOP/s")
    for part in ("val", "test") if args.test else ("val",):
        scores = L.evaluate(result.model, split[part], args.size, original_resolution=False)[0]
        print(f"{part}: per-image Dice {scores['dice'].mean():.4f} (n={len(scores)}, at {args.size}px)")


if __name__ == "__main__":
    main()

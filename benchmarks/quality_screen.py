"""Screen the quality signals of chapter 07 on the validation part (the test part is not read).

Usage: python benchmarks/quality_screen.py [--severities 3] > benchmarks/results/quality/screen.log
Prints, for chapter 03's checkpoint, each signal's AUROC for masks below Dice 0.9 on the validation
X-rays (clean and under chapter 06's shifts), the combined estimate's AUROC and interval coverage when
fitted on one half of the X-rays and scored on the other (both ways), and the time per X-ray.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lungseg_utils as L  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--severities", type=int, nargs="+", default=[3])
    args = parser.parse_args()
    model = L.load_checkpoint(L.find_checkpoint(), L.pick_device())
    size = L.model_image_size(model)
    split = L.three_way_split(L.build_pairs_table())
    started = time.perf_counter()
    quality = L.quality_references(model, *L.load_arrays(split["train"], size))
    bench = L.quality_benchmark(model, *L.load_arrays(split["val"], size), list(split["val"].name), quality,
                                severities=tuple(args.severities))
    print(f"{len(bench)} validation predictions in {(time.perf_counter() - started) / 60:.1f} min, "
          f"{1000 * bench.seconds.mean():.0f} ms per X-ray for the three passes; {(bench.dice < 0.9).mean():.1%} below 0.9")
    bad = bench.dice < 0.9
    for name in L.QUALITY_SIGNALS:
        score = bench[name] if name == "feature_distance" else -bench[name]
        print(f"  {name:18s} AUROC {L.auroc_interval(bad, score, bench.name, n_bootstrap=200)['auroc']:.3f}")
    print(f"  {'warnings':18s} AUROC {L.auroc_interval(bad, bench.warned.astype(float), bench.name, n_bootstrap=200)['auroc']:.3f}")
    names = np.unique(bench.name)
    halves = np.array_split(np.random.default_rng(L.SEED).permutation(names), 2)
    for fit_half, score_half in ((0, 1), (1, 0)):
        fit_rows, score_rows = bench.name.isin(halves[fit_half]), bench.name.isin(halves[score_half])
        part = bench[fit_rows]
        fitted = L.fit_quality_model(quality, part, part.dice, part.name)
        estimate = L.estimate_quality(bench[score_rows], fitted)
        truth = bench.dice[score_rows]
        auroc = L.auroc_interval(truth < 0.9, -estimate.estimated_dice, bench.name[score_rows], n_bootstrap=200)["auroc"]
        print(f"  combined, fitted on half {fit_half}: AUROC {auroc:.3f}, within 0.03 {((estimate.estimated_dice - truth).abs() <= 0.03).mean():.3f}, "
              f"coverage {truth.between(estimate.dice_low, estimate.dice_high).mean():.3f}, flagged {estimate.review.mean():.3f}, "
              f"caught at 10% {L.review_curve(truth < 0.9, -estimate.estimated_dice, [0.1])[0]:.3f}")
    print(bench.groupby("shift")[["dice", *L.QUALITY_SIGNALS]].mean().round(3).to_string())


if __name__ == "__main__":
    main()

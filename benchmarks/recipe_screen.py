"""Screen training recipes for how well they travel to a hospital they never saw (validation parts only).

    python benchmarks/recipe_screen.py baseline travel      # one or more candidates, run one after the other
    python benchmarks/recipe_screen.py --list               # the candidates
    python benchmarks/recipe_screen.py --against travel travel_rotate15   # paired with travel, not the baseline
    python benchmarks/recipe_screen.py --train-on all --out results/x --checkpoint runs/travel-all-seed42/best.pt \
        --clahe-at-prediction --against travel travel           # a travel model with CLAHE at prediction time
    python benchmarks/recipe_screen.py --from-scores travel # summarize stored scores again, without training
    python benchmarks/recipe_screen.py --train-on all --seeds 2 baseline travel   # full-size confirmation
    python benchmarks/recipe_screen.py --train-on all --keep-runs runs --against travel travel_equalized
                                                            # ... keeping the trained model in runs/
    python benchmarks/recipe_screen.py --train-on all --out results/x --checkpoint runs/dicebce-256px/best.pt travel_equalized
                                                            # score a trained model (chapter 03's) as that candidate

By default each candidate trains chapter 06's single-hospital model: Montgomery's training
part (96 X-rays) at 256 px, 20 epochs at most, early stopping on Montgomery's validation
part. ``--train-on all`` trains chapter 03's model instead (both hospitals' training parts,
early stopping on both validation parts); Shenzhen's validation part then no longer measures
another hospital. Each model is scored on the validation parts of both hospitals (14
Montgomery, 57 Shenzhen X-rays), as they are and under every acquisition shift of
``L.apply_shift`` at moderate severity. The test part is never touched: this is for choosing.
``--seeds N`` trains each candidate with N seeds (42, 43, ...); seeds whose scores the
candidate's file in ``--out`` already holds are reused, not trained again (a seed repeats bit
for bit; one ``--out`` folder holds one setup). The log then gives each seed's Dice and the
paired difference between seeds on the same images (how much a seed moves), and comparisons
average each image's Dice over the seeds before pairing it with the baseline's. Per-image scores go to
``<out>/<candidate>.csv``; the summary, with paired differences against ``baseline`` (or the
candidate named by ``--against``; same images, BCa intervals), is appended to ``<out>/run.log``, with the device, the seconds per
epoch and, on a GPU, the peak memory. A Montgomery candidate takes about 25 minutes on a
2-core CPU in fp32 (1.5 training images/s); ``--train-on all`` five times as long.

On a lent GPU without the PNGs, first write a 256 px copy of the data in the Kaggle layout
under the ignored ``data/`` folder (``python benchmarks/pack_data.py``), carry it, and point
``LUNGSEG_DATA_DIR`` at it: the arrays, and so the scores, are the same as from the full copy.
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lungseg_utils as L  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "recipe-screen"
SIZE = 256
FIRST_RECIPE = dict(strong_photometric=False, clahe=False, framing=False, opacity_p=0.0, rotate_limit=35, schedule="onecycle",
                    equalize=False)
TRAVEL = dict(strong_photometric=True, clahe=True, framing=True, opacity_p=0.3, rotate_limit=35, schedule="onecycle",
              equalize=False)
CANDIDATES: dict[str, dict] = {  # each written out in full: the defaults of TrainConfig may change
    "baseline": FIRST_RECIPE,  # chapter 03's first recipe
    "strong_photometric": FIRST_RECIPE | dict(strong_photometric=True),
    "opacity": FIRST_RECIPE | dict(opacity_p=0.3),
    "framing": FIRST_RECIPE | dict(framing=True),
    "clahe": FIRST_RECIPE | dict(clahe=True),
    "travel": TRAVEL,  # chapter 03's recipe from issue 10 until travel_equalized was confirmed at full size
    "travel_rotate15": TRAVEL | dict(rotate_limit=15),  # the rotation range: compare with --against travel
    "travel_constant_lr": TRAVEL | dict(schedule="constant"),  # Adam at 1e-3 throughout: --against travel
    "travel_equalized": TRAVEL | dict(equalize=True),  # chapter 03's recipe: CLAHE on every image, training and prediction
    "travel_equalized_rotate15": TRAVEL | dict(equalize=True, rotate_limit=15),  # the two that won two seeds, combined
    # the loss's weighting (loss = bce_weight * BCE + dice_weight * Dice loss, 1 and 1 by default): --against travel_equalized
    "travel_equalized_dice_heavy": TRAVEL | dict(equalize=True, bce_weight=0.5, dice_weight=1.5),
    # the other levers of the full-model screen, each --against travel_equalized
    "travel_equalized_30_epochs": TRAVEL | dict(equalize=True, epochs=30),  # the one-cycle schedule stretched over 30 epochs
    "travel_equalized_ema": TRAVEL | dict(equalize=True, ema_decay=0.99),  # validated and kept: the weights' moving average
    "travel_equalized_unetplusplus": TRAVEL | dict(equalize=True, architecture="unetplusplus"),  # smp's UNet++ decoder
}
RECIPE_FIELDS = tuple(TRAVEL)


def augmentation_rate(config: L.TrainConfig, images: np.ndarray, masks: np.ndarray, repeats: int = 200) -> float:
    """Images per second that the candidate's augmentation alone delivers on one core."""
    transform = L.train_transforms(config)
    transform.set_random_seed(0)
    started = time.perf_counter()
    for i in range(repeats):
        transform(image=images[i % len(images)], mask=masks[i % len(masks)])
    return repeats / (time.perf_counter() - started)


def score_candidate(
    name: str, split: dict[str, pd.DataFrame], log, epochs: int, train_on: str, seed: int, keep_runs: Path | None = None
) -> pd.DataFrame:
    """Train the candidate with one seed and return its per-image Dice on both validation parts, clean and shifted.

    ``keep_runs``: train into ``<keep_runs>/<candidate>-<train_on>-seed<seed>`` and keep it (a new folder: an existing
    run is never overwritten), e.g. to reuse a full-size model; by default the run lives in a temporary folder.
    """
    config = L.TrainConfig(**{"image_size": SIZE, "epochs": epochs, "seed": seed, **CANDIDATES[name]})  # a candidate may set epochs
    chosen = split if train_on == "all" else {part: rows[rows.source == "Montgomery"] for part, rows in split.items()}
    train_arrays = L.load_arrays(chosen["train"], SIZE)
    log(f"candidate {name}, seed {seed}: {CANDIDATES[name]}; augmentation alone "
        f"{augmentation_rate(config, *train_arrays):.0f} images/s")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = keep_runs / f"{name}-{train_on}-seed{seed}" if keep_runs else Path(folder) / name
        result = L.train(train_arrays, L.load_arrays(chosen["val"], SIZE), run_dir, config)
    memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
    log(f"  trained on {len(train_arrays[0])} images ({train_on}) on {result.device}: best epoch {result.best_epoch} of "
        f"{len(result.history)}, {result.wall_seconds / 60:.1f} min, median {result.history.epoch_seconds.median():.1f} s "
        f"per epoch, {result.history.train_images_per_s.median():.2f} training images/s{memory}")
    if keep_runs:
        log(f"  run kept in {run_dir.name}")
    return score_model(result.model, split, name, seed)


def train_missing_seeds(
    name: str, seeds: list[int], stored_file: Path, split: dict[str, pd.DataFrame], log, epochs: int, train_on: str,
    keep_runs: Path | None = None,
) -> pd.DataFrame:
    """The candidate's scores: every seed stored in ``stored_file`` kept, each seed asked that it lacks trained."""
    stored = pd.read_csv(stored_file) if stored_file.is_file() else pd.DataFrame(columns=["seed"])
    for seed in sorted(set(stored.seed)):
        log(f"candidate {name}, seed {seed}: scores stored in {stored_file.name}, reused")
    frames = [stored] + [score_candidate(name, split, log, epochs, train_on, seed, keep_runs) for seed in seeds if seed not in set(stored.seed)]
    return pd.concat(frames, ignore_index=True)


def score_model(
    model: torch.nn.Module, split: dict[str, pd.DataFrame], name: str, seed: int, clahe: bool = False
) -> pd.DataFrame:
    """Per-image Dice of ``model`` on both validation parts, clean and under every shift at moderate severity.

    ``clahe``: equalise every image (clean or shifted) with ``L.equalize_contrast`` before predicting, for a
    model trained without it (one trained with ``equalize`` does so by itself).
    """
    val_rows = split["val"].reset_index(drop=True)
    images, masks = L.load_arrays(val_rows, SIZE)
    scores = L.shift_benchmark(model, images, masks, list(val_rows.name), severities=(2,),
                               preprocess=L.equalize_contrast if clahe else None)
    scores["source"] = list(val_rows.source) * (len(scores) // len(val_rows))
    scores["candidate"] = name
    scores["seed"] = seed
    return scores


def load_candidate_checkpoint(name: str, path: Path) -> torch.nn.Module:
    """A trained checkpoint whose stored recipe (augmentation and schedule) is candidate ``name``'s (else SystemExit, naming both)."""
    model = L.load_checkpoint(path, L.pick_device())
    asked = L.TrainConfig(**CANDIDATES[name])
    stored = {key: model.lungseg_config.get(key) for key in RECIPE_FIELDS}
    expected = {key: getattr(asked, key) for key in RECIPE_FIELDS}
    if stored != expected:
        sys.exit(f"{path} was trained with {stored}, not candidate {name!r} ({expected}): name the right candidate.")
    return model


def score_groups(scores: pd.DataFrame, train_on: str) -> dict[str, pd.Series]:
    """The three groups every comparison reports: each hospital's clean validation X-rays, and all shifted ones."""
    other = "Shenzhen val, clean (the other hospital)" if train_on == "montgomery" else "Shenzhen val, clean"
    return {
        "Montgomery val, clean": (scores.source == "Montgomery") & (scores["shift"] == "none"),
        other: (scores.source == "Shenzhen") & (scores["shift"] == "none"),
        "both val parts, 16 shifts at moderate severity": scores["shift"] != "none",
    }


def log_seed_differences(scores: pd.DataFrame, log, train_on: str = "montgomery") -> None:
    """Each seed's mean Dice per group, and every later seed minus the first on the same images (BCa intervals)."""
    seeds = sorted(scores.seed.unique())
    by_seed = {seed: scores[scores.seed == seed].reset_index(drop=True) for seed in seeds}
    first = by_seed[seeds[0]]
    for label, chosen in score_groups(first, train_on).items():
        means = ", ".join(f"seed {seed} {rows.dice[score_groups(rows, train_on)[label]].mean():.4f}" for seed, rows in by_seed.items())
        differences = []
        for seed in seeds[1:]:
            merged = first[chosen].merge(by_seed[seed], on=["name", "shift"], suffixes=("", "_other"))
            diff = L.paired_difference(merged.dice_other, merged.dice)
            differences.append(f"seed {seed} minus seed {seeds[0]} {diff['mean_difference']:+.4f} "
                               f"[{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}], mean absolute "
                               f"{(merged.dice_other - merged.dice).abs().mean():.4f} per image")
        log(f"  {label}: {means}; " + "; ".join(differences))


def summarize(
    scores: pd.DataFrame, reference_scores: pd.DataFrame | None, log, train_on: str, reference: str = "baseline"
) -> None:
    """Mean Dice per hospital, clean and over all shifts, with paired differences against ``reference``'s scores.

    With several seeds, each image's Dice is first averaged over the seeds.
    """
    if scores.seed.nunique() > 1:
        log_seed_differences(scores, log, train_on)
    scores = scores.groupby(["name", "shift", "source"], as_index=False)[["dice", "clean_dice", "warned"]].mean()
    for label, chosen in score_groups(scores, train_on).items():
        line = f"  {label}: mean Dice {scores.dice[chosen].mean():.4f} (n={chosen.sum()})"
        if reference_scores is not None:
            merged = scores[chosen].merge(reference_scores, on=["name", "shift"], suffixes=("", "_reference"))
            diff = L.paired_difference(merged.dice, merged.dice_reference)
            line += (f"; against {reference} {diff['mean_difference']:+.4f} [{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}], "
                     f"better on {diff['wins']:.0%} of images")
        log(line)
    shifted = scores[scores["shift"] != "none"]
    drop = L.paired_difference(shifted.clean_dice, shifted.dice)
    log(f"  drop under the shifts from the same images clean: {drop['mean_difference']:.4f} "
        f"[{drop['ci_low']:.4f}, {drop['ci_high']:.4f}]; masks flagged as implausible: clean {scores.warned[scores['shift'] == 'none'].mean():.0%}, "
        f"shifted {shifted.warned.mean():.0%}")
    worst = shifted.groupby("shift").dice.mean().sort_values().head(4)
    log("  hardest shifts: " + ", ".join(f"{shift} {dice:.4f}" for shift, dice in worst.items()))
    if reference_scores is not None:
        merged = shifted.merge(reference_scores, on=["name", "shift"], suffixes=("", "_reference"))
        per_shift = {shift: L.paired_difference(rows.dice, rows.dice_reference) for shift, rows in merged.groupby("shift")}
        ranked = sorted(per_shift.items(), key=lambda item: item[1]["mean_difference"])
        log(f"  per shift against {reference}: " + ", ".join(
            f"{shift} {d['mean_difference']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" for shift, d in ranked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="*", metavar="CANDIDATE")
    parser.add_argument("--list", action="store_true", help="print the candidates and exit")
    parser.add_argument("--epochs", type=int, default=20,
                        help="at most this many epochs (20, as chapters 03 and 06), unless the candidate sets its own")
    parser.add_argument("--train-on", choices=("montgomery", "all"), default="montgomery",
                        help="Montgomery's 96 training X-rays (default) or both hospitals' training parts")
    parser.add_argument("--seeds", type=int, default=1, help="train each candidate with this many seeds (default 1)")
    parser.add_argument("--against", default="baseline", metavar="CANDIDATE",
                        help="pair each candidate's scores with this candidate's, stored in the --out folder (default baseline)")
    parser.add_argument("--clahe-at-prediction", action="store_true",
                        help="with --checkpoint: equalise each image with CLAHE before predicting (scores stored as "
                        "<candidate>+clahe_at_prediction)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the log and the per-image scores")
    parser.add_argument("--from-scores", action="store_true",
                        help="summarize the per-image scores stored in the --out folder again, without training")
    parser.add_argument("--checkpoint", type=Path, help="score this trained checkpoint of the (one) candidate named, "
                        "instead of training it: e.g. chapter 03's model, to confirm a candidate at full size")
    parser.add_argument("--keep-runs", type=Path, metavar="FOLDER",
                        help="keep each trained run (best.pt, last.pt, history.csv) in a new folder under FOLDER, "
                        "e.g. runs/, instead of a temporary one")
    args = parser.parse_args()
    unknown = [name for name in [*args.candidates, args.against] if name not in CANDIDATES]
    if args.checkpoint and len(args.candidates) != 1:
        parser.error("--checkpoint scores one checkpoint: name the one candidate it was trained as")
    if args.clahe_at_prediction and not (args.checkpoint or args.from_scores):
        parser.error("--clahe-at-prediction scores a trained --checkpoint (or its stored scores, with --from-scores)")
    if args.list or not args.candidates or unknown:
        if unknown:
            print(f"unknown candidate(s): {', '.join(unknown)}; choose from:")
        for name, options in CANDIDATES.items():
            print(f"{name:20s} {options}")
        sys.exit(1 if unknown else 0)
    results = args.out
    results.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)
        with open(results / "run.log", "a") as handle:
            handle.write(line + "\n")

    table = L.build_pairs_table(L.find_data_dir())
    split = L.three_way_split(table)
    log(f"--- {time.strftime('%Y-%m-%d %H:%M')}; {L.describe_data(table)}; trained on {args.train_on}; "
        f"at most {args.epochs} epochs; {args.seeds} seed(s)")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{L.cpu_model_name()}, {torch.get_num_threads()} threads"
    log(" | ".join(f"{k} {v}" for k, v in L.library_versions().items()) + f" | {device}")
    seeds = [L.SEED + i for i in range(args.seeds)]
    for name in args.candidates:
        label = name + ("+clahe_at_prediction" if args.clahe_at_prediction else "")
        if args.from_scores:
            if not (results / f"{label}.csv").is_file():
                sys.exit(f"No stored scores {results / f'{label}.csv'}: run the candidate first, or give its --out folder.")
            log(f"candidate {label}: the scores stored in {label}.csv, summarized again")
            scores = pd.read_csv(results / f"{label}.csv")
        elif args.checkpoint:
            model = load_candidate_checkpoint(name, args.checkpoint)
            if args.clahe_at_prediction and model.lungseg_config.get("equalize"):
                sys.exit(f"{args.checkpoint} was trained with equalize=True: it equalises every image by itself.")
            clahe = ", CLAHE on every image at prediction time" if args.clahe_at_prediction else ""
            log(f"candidate {label}: checkpoint {args.checkpoint.name} (epoch {model.lungseg_config['epoch']}, seed "
                f"{model.lungseg_config['seed']}, {model.lungseg_config['image_size']} px), scored without training{clahe}")
            scores = score_model(model, split, label, model.lungseg_config["seed"], clahe=args.clahe_at_prediction)
        else:
            scores = train_missing_seeds(name, seeds, results / f"{label}.csv", split, log, args.epochs, args.train_on,
                                         args.keep_runs)
        if not args.from_scores:
            table = scores.to_csv(index=False).encode()
            L.write_atomically(results / f"{label}.csv", lambda file: file.write(table))
        reference_file = results / f"{args.against}.csv"
        reference_scores = None
        if label != args.against and reference_file.is_file():
            reference_scores = pd.read_csv(reference_file).groupby(["name", "shift"], as_index=False).dice.mean()
        summarize(scores, reference_scores, log, args.train_on, args.against)

if __name__ == "__main__":
    main()

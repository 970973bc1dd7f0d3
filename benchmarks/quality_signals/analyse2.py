"""Quality-signal screen, step 3: combinations of signals, linear or gradient-boosted regression onto log(1.001 - Dice),
scored by grouped 2-fold cross-validation over the validation X-rays (5 random halvings).
"""
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "benchmarks" / "_work"
import sys, math
import numpy as np, pandas as pd
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import roc_auc_score
data = pd.read_pickle(WORK / "val_signals.pkl")
DICE_LIKE = {"self_dice", "tta_moved", "tta_bigger", "tta_blur", "tta_gamma", "tta_bright", "tta_mean2", "tta_all", "tta_min", "shape_fit", "crop_fit", "area_ratio"}
def X(cols):
    return np.stack([np.log(1.001 - data[c].clip(0, 1)) if c in DICE_LIKE else data[c] for c in cols], 1)
y = np.log(1.001 - data.dice.clip(0, 1)); bad = (data.dice < 0.9).values
names = data.name.unique()
def cv(cols, kind="lin", reps=10):
    res = []
    Xm = X(cols)
    for rep in range(reps):
        perm = np.random.default_rng(rep).permutation(names); half = np.isin(data.name, perm[: len(names) // 2])
        for fit in (half, ~half):
            sc = ~fit
            if kind == "lin": mdl = LinearRegression().fit(Xm[fit], y[fit]); pr = mdl.predict(Xm[sc])
            elif kind == "hgb": mdl = HistGradientBoostingRegressor(max_depth=3, max_iter=150, learning_rate=0.05, min_samples_leaf=40).fit(Xm[fit], y[fit]); pr = mdl.predict(Xm[sc])
            est = 1.001 - np.exp(pr); truth = data.dice.values[sc]
            if bad[sc].sum() == 0 or bad[sc].all(): continue
            order = np.argsort(est); k = int(round(0.1 * sc.sum()))
            caught = bad[sc][order[:k]].sum() / bad[sc].sum()
            res.append((roc_auc_score(bad[sc], -est), np.mean(np.abs(est - truth) <= 0.03), caught))
    return np.mean(res, 0)
sets = {
 "current4": ["self_dice", "tta_mean2", "shape_fit", "fd"],
 "self": ["self_dice"],
 "self+unc": ["self_dice", "uncertain"],
 "tta_all": ["self_dice", "tta_all", "tta_min"],
 "allviews": ["self_dice", "tta_moved", "tta_bigger", "tta_blur", "tta_gamma", "tta_bright"],
 "crop": ["self_dice", "tta_mean2", "crop_fit", "crop_maha", "fd"],
 "geom": ["self_dice", "tta_mean2", "crop_fit", "crop_maha", "fraction", "area_ratio", "n_comp", "fd"],
 "geom2": ["self_dice", "tta_blur", "crop_fit", "fraction", "area_ratio"],
 "geom3": ["self_dice", "uncertain", "tta_blur", "tta_moved", "crop_fit", "fraction", "area_ratio", "fd"],
 "everything": ["self_dice", "uncertain", "tta_moved", "tta_bigger", "tta_blur", "tta_gamma", "tta_bright", "shape_fit", "shape_maha", "crop_fit", "crop_maha", "fraction", "area_ratio", "n_comp", "fd", "fd3"],
}
for label, cols in sets.items():
    for kind in ("lin", "hgb"):
        print(f"{label:10s} {kind}: AUROC {{:.3f}} within.03 {{:.3f}} caught@10% {{:.3f}}".format(*cv(cols, kind, reps=5)), flush=True)

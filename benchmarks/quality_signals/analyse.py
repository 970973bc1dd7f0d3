"""Quality-signal screen, step 2: compute every candidate signal per validation prediction and its AUROC alone.

Slow (one Python loop over about 2,300 predictions: about an hour on 2 cores). Output: benchmarks/results/quality/signal-screen.log.
"""
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "benchmarks" / "_work"
import sys, time
import numpy as np, cv2, pandas as pd
sys.path.insert(0, str(ROOT))
import lungseg_utils as L
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

c = np.load(WORK / "cache_val.npz")
tr = np.load(WORK / "cache_train.npz")
meta = pd.DataFrame(c["meta"], columns=["name", "shift", "severity"]); meta.severity = meta.severity.astype(int)
probs = c["probs"].astype(np.float32); masks = c["masks"]
pred = probs > 0.5
meta["dice"] = L.dice_iou_per_image(pred, masks)[0]
VIEWS = ["moved", "bigger", "blur", "gamma", "bright"]
S = 64
def small(m): return cv2.resize(m.astype(np.float32), (S, S), interpolation=cv2.INTER_AREA)
def crop_small(m):
    ys, xs = np.nonzero(m)
    if len(ys) == 0: return np.zeros((S, S), np.float32)
    return cv2.resize(m[ys.min():ys.max()+1, xs.min():xs.max()+1].astype(np.float32), (S, S), interpolation=cv2.INTER_AREA)
trm = tr["masks"]
pca_raw = PCA(12, random_state=0).fit(np.stack([small(m).ravel() for m in trm]))
pca_crop = PCA(12, random_state=0).fit(np.stack([crop_small(m).ravel() for m in trm]))
def fit_of(pca, v):
    co = pca.transform(v[None])[0]; rec = pca.inverse_transform(co[None])[0]
    return L.dice_of(v > 0.5, rec > 0.5), float(np.sum(co**2 / pca.explained_variance_))
ftr = L._unit_rows(tr["feats"]); ftr3 = L._unit_rows(tr["feats3"])
fd = 1 - np.sort(-(-(L._unit_rows(c["feats"]) @ ftr.T)), axis=1)[:, ::-1][:, :5].mean(1)
fd3 = 1 - np.sort(L._unit_rows(c["feats3"]) @ ftr3.T, axis=1)[:, ::-1][:, :5].mean(1)
rows = []
t = time.time()
for i in range(len(meta)):
    p, m = probs[i], pred[i]
    r = dict(self_dice=L.self_dice(p), uncertain=float(((p > 0.1) & (p < 0.9)).sum() / max(m.sum(), 1)))
    backs = [c[v][i].astype(np.float32) for v in VIEWS]
    for v, b in zip(VIEWS, backs):
        r[f"tta_{v}"] = L.dice_of(m, b > 0.5)
    r["tta_mean2"] = (r["tta_moved"] + r["tta_blur"]) / 2
    r["tta_all"] = float(np.mean([r[f"tta_{v}"] for v in VIEWS]))
    r["tta_min"] = float(np.min([r[f"tta_{v}"] for v in VIEWS]))
    r["shape_fit"], r["shape_maha"] = fit_of(pca_raw, small(m).ravel())
    r["crop_fit"], r["crop_maha"] = fit_of(pca_crop, crop_small(m).ravel())
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8))
    areas = np.sort(stats[1:, 4])[::-1] if n > 1 else np.array([0])
    r["fraction"] = float(m.mean()); r["n_comp"] = n - 1
    r["area_ratio"] = float(areas[1] / areas[0]) if len(areas) > 1 and areas[0] else 0.0
    rows.append(r)
print(f"{time.time()-t:.0f}s")
sig = pd.DataFrame(rows); sig["fd"] = fd; sig["fd3"] = fd3
data = pd.concat([meta, sig], axis=1)
data.to_pickle(WORK / "val_signals.pkl")
bad = data.dice < 0.9
print(f"{len(data)} rows, bad {bad.mean():.3f}")
for col in sig.columns:
    a = roc_auc_score(bad, data[col]); print(f"{col:12s} AUROC {max(a, 1-a):.3f} ({'high=bad' if a > 0.5 else 'low=bad'})")

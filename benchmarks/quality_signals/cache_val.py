"""Quality-signal screen, step 1: cache the validation predictions of chapter 03's checkpoint (the test part is not read).

Usage: python benchmarks/quality_signals/cache_val.py val   (about 14 min on a 2-core Xeon with bf16).
Writes, into benchmarks/_work/ (ignored by git; derived from the data, never committed), the probability maps of each
validation X-ray, clean and under chapter 06's 16 shifts at severities 2 and 3, as the model sees it and under five
test-time views (moved, bigger, blurred, darker gamma, brighter gamma; geometric views mapped back), its encoder
features, and the training masks and features for the references.
"""
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "benchmarks" / "_work"
import sys, time
from pathlib import Path
import numpy as np, cv2, torch
sys.path.insert(0, str(ROOT))
import lungseg_utils as L

model = L.load_checkpoint(L.find_checkpoint(), L.pick_device())
size = L.model_image_size(model)
split = L.three_way_split(L.build_pairs_table())
for part in sys.argv[1:]:
    images, masks = L.load_arrays(split[part], size)
    names = list(split[part].name)
    def warp(img, scale, dx, dy):
        m = cv2.getRotationMatrix2D((size / 2, size / 2), 0, scale); m[:, 2] += (dx * size, dy * size)
        return m
    VIEWS = {
        "moved": (warp(None, 0.92, 0.03, 0.02), None),
        "bigger": (warp(None, 1.08, -0.03, 0.0), None),
        "blur": (None, lambda x: cv2.GaussianBlur(x, (0, 0), sigmaX=1.5)),
        "gamma": (None, lambda x: (255 * (x / 255.0) ** 1.6).astype(np.uint8)),
        "bright": (None, lambda x: (255 * (x / 255.0) ** 0.6).astype(np.uint8)),
    }
    out = {k: [] for k in ["probs", "masks", "images", "feats", "feats3", *VIEWS]}
    meta = []
    conds = [("none", 0, images, masks), *L.shifted_copies(images, masks, L.SHIFTS, (2, 3))]
    t = time.time()
    for shift, sev, im, mk in conds:
        collected = []
        def hook(module, inputs, outputs):
            collected.append([o.float().mean(dim=(2, 3)).cpu().numpy() for o in outputs[-3:]])
        h = model.encoder.register_forward_hook(hook)
        p = L.predict_arrays(model, im)
        h.remove()
        out["feats"].append(np.concatenate([c[2] for c in collected])); out["feats3"].append(np.concatenate([np.concatenate(c[:2], 1) for c in collected]))
        out["probs"].append(p.astype(np.float16)); out["masks"].append(mk.astype(bool)); out["images"].append(im)
        for name, (m, f) in VIEWS.items():
            if m is not None:
                v = np.stack([cv2.warpAffine(x, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0) for x in im])
                pv = L.predict_arrays(model, v)
                back = np.stack([cv2.warpAffine(q, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) for q in pv])
            else:
                back = L.predict_arrays(model, np.stack([f(x) for x in im]))
            out[name].append(back.astype(np.float16))
        meta += [(n, shift, sev) for n in names]
        print(shift, sev, f"{time.time() - t:.0f}s", flush=True)
    np.savez(WORK / f"cache_{part}.npz", **{k: np.concatenate(v) for k, v in out.items()},
             meta=np.array(meta, dtype=object).astype(str))
    # training references
tr_images, tr_masks = L.load_arrays(split["train"], size)
collected = []
h = model.encoder.register_forward_hook(lambda m, i, o: collected.append([x.float().mean(dim=(2, 3)).cpu().numpy() for x in o[-3:]]))
L.predict_arrays(model, tr_images); h.remove()
np.savez(WORK / "cache_train.npz", masks=tr_masks.astype(bool), feats=np.concatenate([c[2] for c in collected]),
         feats3=np.concatenate([np.concatenate(c[:2], 1) for c in collected]))
print("done")

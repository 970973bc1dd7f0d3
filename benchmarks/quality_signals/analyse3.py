"""Quality-signal screen, step 4: the same combinations as a balanced logistic classifier of Dice < 0.9.
"""
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "benchmarks" / "_work"
import sys
import numpy as np, pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.pipeline import make_pipeline
from sklearn.metrics import roc_auc_score
src=open(Path(__file__).with_name("analyse2.py")).read()
exec(src.split("def cv")[0]); exec("sets = {" + src.split("sets = {")[1].split("\nfor label")[0])
def cvlog(cols, reps=5):
    res=[]; Xm=X(cols)
    for rep in range(reps):
        perm=np.random.default_rng(rep).permutation(names); half=np.isin(data.name, perm[:len(names)//2])
        for fit in (half,~half):
            sc=~fit
            m=make_pipeline(StandardScaler(), LogisticRegression(C=0.3, class_weight="balanced", max_iter=1000)).fit(Xm[fit], bad[fit])
            s=m.predict_proba(Xm[sc])[:,1]; order=np.argsort(-s); k=int(round(0.1*sc.sum()))
            res.append((roc_auc_score(bad[sc], s), bad[sc][order[:k]].sum()/bad[sc].sum()))
    return np.mean(res,0)
for label, cols in sets.items():
    print(f"{label:10s} logistic: AUROC {{:.3f}} caught@10% {{:.3f}}".format(*cvlog(cols)))

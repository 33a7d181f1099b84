#!/usr/bin/env python3
"""The paper's SVR grid (C 1..100, epsilon 0..0.5 step 0.05, KFold(3), R²)
with scikit-learn GridSearchCV beside `cellmorph svr grid`, on the same data
and machine.

Data: the 29-sample × 128-feature profile table of tests/fixtures/svr and a
218-gene expression table made from its 6 genes plus seeded noise (written to
OUT/expression_218.csv). scikit-learn is timed on --sk-genes genes (it needs
about 10 s per gene on 2 cores) and the total for 218 genes extrapolated
linearly; cellmorph runs all 218. Prints one table row per tool.

Also importable: `run(...)` returns the measurements as a dict (used by
benches/compare/compare.py); with sk_genes=0 or without scikit-learn only
cellmorph is timed.

usage: benches/compare/svr_paper_grid.py [--cellmorph target/release/cellmorph]
           [--sk-genes 3] [--out /tmp/svr-compare] [--device cpu]
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

N_GENES = 218
GRID_C = list(range(1, 101))
GRID_EPS = [round(0.05 * i, 2) for i in range(11)]
FOLDS = 3
PROBLEMS = N_GENES * len(GRID_C) * len(GRID_EPS) * FOLDS


def read_table(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    names = [r[0] for r in body]
    data = np.array([[float(v) for v in r[1:]] for r in body])
    return names, header[1:], data


def fixture_dir():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "svr")


def make_data(out):
    """Writes OUT/expression_218.csv; returns (features_csv, expression_csv, X, Y218, gene names)."""
    os.makedirs(out, exist_ok=True)
    fx = fixture_dir()
    feats = os.path.join(fx, "grid_features.csv")
    samples, _, X = read_table(feats)
    esamples, _, Y = read_table(os.path.join(fx, "grid_expression.csv"))
    assert samples == esamples
    rng = np.random.default_rng(20230101)
    cols, names = [], []
    for g in range(N_GENES):
        base = Y[:, g % Y.shape[1]]
        cols.append(base + rng.normal(0, 0.3, size=base.shape) * (g >= Y.shape[1]))
        names.append(f"G{g:03d}")
    Y218 = np.stack(cols, axis=1)
    expr = os.path.join(out, "expression_218.csv")
    with open(expr, "w") as f:
        f.write("sample," + ",".join(names) + "\n")
        for s, row in zip(samples, Y218):
            f.write(s + "," + ",".join(repr(float(v)) for v in row) + "\n")
    return feats, expr, X, Y218, names


def run(cellmorph, sk_genes=3, out="/tmp/svr-compare", device="cpu"):
    """Times scikit-learn on `sk_genes` genes (extrapolated to 218) and
    `cellmorph svr grid` on all 218 (whole command: CSV in, JSON out).

    Returns a dict: problems, ours_s, sk_s (timed part or None), sk_genes,
    sk_total_s (extrapolated or None), sklearn_version, and, per timed gene,
    the best (C, epsilon) and mean CV score of both tools (`genes`).
    Raises subprocess.CalledProcessError when cellmorph fails."""
    feats, expr, X, Y218, names = make_data(out)
    res = {"problems": PROBLEMS, "genes_total": N_GENES, "sk_genes": 0, "sk_s": None,
           "sk_total_s": None, "sklearn_version": None, "genes": []}
    sk_best = []
    if sk_genes > 0:
        try:
            import sklearn
            from sklearn.model_selection import GridSearchCV, KFold
            from sklearn.svm import SVR
        except ImportError:
            sk_genes = 0
        else:
            res["sklearn_version"] = sklearn.__version__
            grid = {"C": GRID_C, "epsilon": GRID_EPS}
            t0 = time.perf_counter()
            for g in range(sk_genes):
                gs = GridSearchCV(SVR(kernel="linear"), grid, cv=KFold(FOLDS), n_jobs=-1)
                gs.fit(X, Y218[:, g])
                sk_best.append((gs.best_params_["C"], gs.best_params_["epsilon"], float(gs.best_score_)))
            res["sk_s"] = time.perf_counter() - t0
            res["sk_genes"] = sk_genes
            res["sk_total_s"] = res["sk_s"] / sk_genes * N_GENES

    model = os.path.join(out, "model.json")
    t0 = time.perf_counter()
    subprocess.run(
        [cellmorph, "svr", "grid", "--features", feats, "--expression", expr, "--output", model,
         "--device", device],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    res["ours_s"] = time.perf_counter() - t0
    with open(model) as f:
        genes = json.load(f)["genes"]
    for g, sk in enumerate(sk_best):
        m = genes[names[g]]
        res["genes"].append({"gene": names[g], "sk_C": sk[0], "sk_epsilon": sk[1], "sk_cv": sk[2],
                             "ours_C": m["C"], "ours_epsilon": m["epsilon"], "ours_cv": m["cv_score"]})
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cellmorph", default="target/release/cellmorph")
    ap.add_argument("--sk-genes", type=int, default=3)
    ap.add_argument("--out", default="/tmp/svr-compare")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    r = run(a.cellmorph, a.sk_genes, a.out, a.device)
    problems = r["problems"]
    print(f"{'tool':<40} {'time (s)':>10} {'problems/s':>12}")
    if r["sk_total_s"] is not None:
        print(f"{'scikit-learn GridSearchCV (n_jobs=-1)':<40} {r['sk_total_s']:>10.1f} "
              f"{problems / r['sk_total_s']:>12.0f}"
              f"   (timed on {r['sk_genes']} genes: {r['sk_s']:.1f} s, extrapolated to {N_GENES})")
    print(f"{'cellmorph svr grid --device ' + a.device:<40} {r['ours_s']:>10.2f} {problems / r['ours_s']:>12.0f}"
          f"   (whole command, {N_GENES} genes)")
    if r["sk_total_s"] is not None:
        print(f"ratio scikit-learn / cellmorph: {r['sk_total_s'] / r['ours_s']:.0f}x")
    for g in r["genes"]:
        print(f"{g['gene']}: best (C, eps, cv) scikit-learn ({g['sk_C']}, {g['sk_epsilon']}, {g['sk_cv']:.6f}),"
              f" cellmorph ({g['ours_C']}, {g['ours_epsilon']}, {g['ours_cv']:.6f})")


if __name__ == "__main__":
    sys.exit(main())

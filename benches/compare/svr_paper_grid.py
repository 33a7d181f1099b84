#!/usr/bin/env python3
"""The paper's SVR grid (C 1..100, epsilon 0..0.5 step 0.05, KFold(3), R²)
with scikit-learn GridSearchCV beside `cellmorph svr grid`, on the same data
and machine.

Data: the 29-sample × 128-feature profile table of tests/fixtures/svr and a
218-gene expression table made from its 6 genes plus seeded noise (written to
OUT/expression_218.csv). scikit-learn is timed on --sk-genes genes (it needs
about 10 s per gene on 2 cores) and the total for 218 genes extrapolated
linearly; cellmorph runs all 218. Prints one table row per tool.

usage: benches/compare/svr_paper_grid.py [--cellmorph target/release/cellmorph]
           [--sk-genes 3] [--out /tmp/svr-compare] [--device cpu]
"""
import argparse
import csv
import os
import subprocess
import sys
import time

import numpy as np


def read_table(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    names = [r[0] for r in body]
    data = np.array([[float(v) for v in r[1:]] for r in body])
    return names, header[1:], data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cellmorph", default="target/release/cellmorph")
    ap.add_argument("--sk-genes", type=int, default=3)
    ap.add_argument("--out", default="/tmp/svr-compare")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    fx = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "svr")
    samples, feat_names, X = read_table(os.path.join(fx, "grid_features.csv"))
    esamples, genes, Y = read_table(os.path.join(fx, "grid_expression.csv"))
    assert samples == esamples
    rng = np.random.default_rng(20230101)
    cols, names = [], []
    for g in range(218):
        base = Y[:, g % Y.shape[1]]
        cols.append(base + rng.normal(0, 0.3, size=base.shape) * (g >= Y.shape[1]))
        names.append(f"G{g:03d}")
    Y218 = np.stack(cols, axis=1)
    expr = os.path.join(a.out, "expression_218.csv")
    with open(expr, "w") as f:
        f.write("sample," + ",".join(names) + "\n")
        for s, row in zip(samples, Y218):
            f.write(s + "," + ",".join(repr(float(v)) for v in row) + "\n")

    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.svm import SVR

    grid = {"C": list(range(1, 101)), "epsilon": [round(0.05 * i, 2) for i in range(11)]}
    t0 = time.perf_counter()
    for g in range(a.sk_genes):
        gs = GridSearchCV(SVR(kernel="linear"), grid, cv=KFold(3), n_jobs=-1)
        gs.fit(X, Y218[:, g])
    sk = time.perf_counter() - t0
    sk_total = sk / a.sk_genes * 218

    t0 = time.perf_counter()
    subprocess.run(
        [a.cellmorph, "svr", "grid", "--features", os.path.join(fx, "grid_features.csv"),
         "--expression", expr, "--output", os.path.join(a.out, "model.json"),
         "--device", a.device],
        check=True, stdout=subprocess.DEVNULL)
    ours = time.perf_counter() - t0
    problems = 218 * 1100 * 3
    print(f"{'tool':<40} {'time (s)':>10} {'problems/s':>12}")
    print(f"{'scikit-learn GridSearchCV (n_jobs=-1)':<40} {sk_total:>10.1f} {problems / sk_total:>12.0f}"
          f"   (timed on {a.sk_genes} genes: {sk:.1f} s, extrapolated to 218)")
    print(f"{'cellmorph svr grid --device ' + a.device:<40} {ours:>10.2f} {problems / ours:>12.0f}"
          f"   (whole command, 218 genes)")
    print(f"ratio scikit-learn / cellmorph: {sk_total / ours:.0f}x")


if __name__ == "__main__":
    sys.exit(main())

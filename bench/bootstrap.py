"""Time the vectorized bootstrap against a slow per-resample sklearn loop.

Run from the repository root: ``python -m bench.bootstrap`` (``--help`` lists the options).
The data mimic the paper's test set: N images, 5 classes, about 98% accuracy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from utils.evaluate import metrics as M


def reference_bootstrap(y_true, y_pred, num_classes, weights):
    """The obvious loop: one sklearn call per resample (labels present in that resample)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out = []
    for w in weights:
        idx = np.repeat(np.arange(y_true.size), w)
        t, p = y_true[idx], y_pred[idx]
        prec, rec, f1, _ = precision_recall_fscore_support(t, p, average="macro",
                                                           zero_division=0)
        out.append((accuracy_score(t, p), prec, rec, f1))
    return np.array(out)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=2419, help="images (the paper's test set)")
    parser.add_argument("--num-classes", type=int, default=5, help="classes")
    parser.add_argument("--resamples", type=int, nargs="+", default=[1000, 10000],
                        help="bootstrap sizes to time for the vectorized version")
    parser.add_argument("--reference-resamples", type=int, default=100,
                        help="resamples for the slow reference loop (0 skips it)")
    parser.add_argument("--groups", type=int, default=800,
                        help="patients for the group-bootstrap rows (0 skips them)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per timing (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    k = args.num_classes
    t = rng.integers(0, k, args.n)
    p = np.where(rng.random(args.n) < 0.98, t, rng.integers(0, k, args.n))
    groups = rng.integers(0, args.groups, args.n) if args.groups else None

    rows = []  # (what, resamples, seconds)
    for b in args.resamples:
        sec = _median_seconds(lambda: M.bootstrap_metrics(t, p, k, n_resamples=b,
                                                          unit="image"), args.repeats)
        rows.append(("vectorized, image", b, sec))
        if groups is not None:
            sec = _median_seconds(lambda: M.bootstrap_metrics(
                t, p, k, groups=groups, n_resamples=b, unit="group"), args.repeats)
            rows.append((f"vectorized, group ({args.groups} groups)", b, sec))
    if args.reference_resamples:
        b = args.reference_resamples
        weights = M.draw_bootstrap_weights(args.n, None, b, np.random.default_rng(42))
        sec = _median_seconds(lambda: reference_bootstrap(t, p, k, weights), args.repeats)
        rows.append(("sklearn loop (reference)", b, sec))

    print(f"N={args.n}, K={k}, median of {args.repeats} runs, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print("| method | resamples | seconds | ms / 1000 resamples |")
    print("|---|---|---|---|")
    for what, b, sec in rows:
        print(f"| {what} | {b} | {sec:.3f} | {1e6 * sec / b:.1f} |")


if __name__ == "__main__":
    main()

"""Shortcut check: how much a trained model relies on source artefacts rather than anatomy.

    python -m bench.shortcuts --model runs/small128 --data data/radiographs128 \\
        --sources ../shared/radiographs/manifest.csv

On the held-out split (--split, test): a logistic-regression probe predicting each image's source
repository from the model's features (cross-validated by patient group; overall and within each
class that has more than one source, against the majority-source baseline), macro F1 with the
border band (8 %, 15 %) and text-like regions masked against the unmasked F1, and the share of
the Grad-CAM mass outside the body and in the border band. Every number has a bootstrap CI over
patient groups. The method and its limits: utils/evaluate/shortcuts.py. A recipe that lowers
these at equal F1 relies less on the archive.

Prints a Markdown table and writes shortcuts.json and shortcuts.md to --output (default: the run
directory's shortcuts/ folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory or .keras file (a model of models/registry.py)")
    parser.add_argument("--data", default=None,
                        help="prepared dataset at the model's spec (default: the one the run was trained on)")
    parser.add_argument("--sources", required=True,
                        help="manifest.csv with file (relative to its folder) and source_repo columns")
    parser.add_argument("--split", default="test", help="held-out split to measure on (test)")
    parser.add_argument("--probe-split", default=None,
                        help="split the source probe runs on: a split name or 'all' (default: --split)")
    parser.add_argument("--border", type=float, nargs="+", default=[0.08, 0.15],
                        help="border bands to mask, share of each side (0.08 0.15)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (1000; 0: no CIs)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-cam", action="store_true", help="leave Grad-CAM out")
    parser.add_argument("--cam-layer", default=None,
                        help="layer for Grad-CAM (default: the backbone's last spatial layer)")
    parser.add_argument("--output", default=None, help="folder for shortcuts.json/.md (default: MODEL/shortcuts)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from utils.evaluate import shortcuts

    start = time.perf_counter()
    summary = shortcuts.run(args.model, args.data, args.sources, split=args.split, probe_split=args.probe_split,
                            fractions=tuple(args.border), n_resamples=args.resamples, seed=args.seed,
                            batch_size=args.batch_size, cam=not args.no_cam, cam_layer=args.cam_layer)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    model = Path(args.model)
    out = Path(args.output) if args.output else (model if model.is_dir() else model.parent) / "shortcuts"
    json_path, md_path = shortcuts.write(summary, out)
    print(shortcuts.markdown(summary))
    print(f"wrote {json_path} and {md_path} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

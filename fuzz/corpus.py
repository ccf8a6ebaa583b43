"""A deterministic corpus of malformed DICOM files for the reader's promise.

``generate(output_dir)`` (or ``python -m fuzz.corpus --output DIR``) writes a few hundred
files named by kind (``voi_lut-003.dcm``...) and ``manifest.csv`` (file, kind, description).
Every file is a small valid one (a base, see ``fuzz.bases``) with something broken on
purpose; the ``valid`` kind holds the bases themselves and must decode. ``KINDS`` lists the
kinds and what they break (``fuzz.kinds``). The same ``seed`` gives the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
import sys
from collections.abc import Mapping
from pathlib import Path

from fuzz.bases import build_bases
from fuzz.kinds import KINDS, MAKERS

DEFAULT_PER_KIND = 16
MANIFEST = "manifest.csv"

__all__ = ["DEFAULT_PER_KIND", "KINDS", "MANIFEST", "generate", "read_manifest", "write_seeds"]


def generate(
    output_dir: str | Path, *, seed: int = 0, per_kind: int | Mapping[str, int] = DEFAULT_PER_KIND
) -> list[Path]:
    """Write the corpus into ``output_dir`` and return the paths of its files (not the manifest).

    ``per_kind``: files per kind (an int for all, or kind -> count); the ``valid`` kind always
    holds every base. The same ``seed`` and ``per_kind`` give byte-identical files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    bases = build_bases(seed)
    paths, rows = [], []
    for kind, maker in MAKERS.items():
        rng = random.Random(f"{seed}:{kind}")
        count = len(bases) if kind == "valid" else _count(per_kind, kind)
        for index, (base, data, what) in enumerate(itertools.islice(maker(bases, rng), count)):
            path = output_dir / f"{kind}-{index:03d}.dcm"
            path.write_bytes(data)
            paths.append(path)
            rows.append({"file": path.name, "kind": kind, "description": f"{base}: {what}" if base else what})
    with open(output_dir / MANIFEST, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "kind", "description"])
        writer.writeheader()
        writer.writerows(rows)
    return paths


def read_manifest(corpus_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(corpus_dir) / MANIFEST, newline="") as f:
        return list(csv.DictReader(f))


def write_seeds(output_dir: str | Path, *, seed: int = 0, max_bytes: int = 64 * 1024) -> list[Path]:
    """The bases no larger than ``max_bytes`` (the fuzzer's -max_len) as ``seed-<name>.dcm``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, base in build_bases(seed).items():
        if len(base.data) <= max_bytes:
            path = output_dir / f"seed-{name}.dcm"
            path.write_bytes(base.data)
            paths.append(path)
    return paths


def _count(per_kind: int | Mapping[str, int], kind: str) -> int:
    if isinstance(per_kind, Mapping):
        return int(per_kind.get(kind, DEFAULT_PER_KIND))
    return int(per_kind)


# --- Command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", required=True, type=Path, help="directory to write the corpus into")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    parser.add_argument("--per-kind", type=int, default=DEFAULT_PER_KIND, help="files per kind (valid: every base)")
    parser.add_argument(
        "--seeds-only",
        action="store_true",
        help="write only the small valid bases (a seed corpus for fuzz.reader_target)",
    )
    args = parser.parse_args(argv)
    if args.seeds_only:
        paths = write_seeds(args.output, seed=args.seed)
        print(f"{len(paths)} seed files in {args.output}")
        return 0
    paths = generate(args.output, seed=args.seed, per_kind=args.per_kind)
    counts: dict[str, int] = {}
    for row in read_manifest(args.output):
        counts[row["kind"]] = counts.get(row["kind"], 0) + 1
    total = sum(path.stat().st_size for path in paths)
    for kind, count in counts.items():
        print(f"{kind:<16} {count:>4}")
    print(f"{len(paths)} files, {total / 1e6:.1f} MB in {args.output} (manifest: {MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

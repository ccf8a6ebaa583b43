"""Helpers for driving dcmtk's command-line peers (storescu, storescp) in tests, benchmarks and docs.

Run them with :func:`environment` (TCP_NODELAY=1). From the shell:
``python -m utils.routing.delivery.dcmtk FOLDER --output scu.cfg`` writes the profile. pynetdicom installs Python apps named ``storescu``/``storescp`` too, and they may come first on
PATH; :func:`find_tool` returns dcmtk's own binary. dcmtk's storescu proposes uncompressed
transfer syntaxes unless told otherwise and cannot send an RLE or JPEG 2000 file as it is;
:func:`storescu_profile` writes an association profile with one presentation context per SOP
class and transfer syntax present in the files, so each file travels in its own syntax.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PROFILE = "Router"  # the profile name inside the file storescu_profile writes


def environment() -> dict[str, str]:
    """os.environ plus TCP_NODELAY=1: Debian's dcmtk leaves Nagle's algorithm on, which with delayed
    ACKs costs up to 40 ms per message on loopback (storescu -> storescp: ~20 small files/s, not 600)."""
    return {**os.environ, "TCP_NODELAY": "1"}


@cache
def find_tool(name: str) -> str | None:
    """Path of dcmtk's ``name`` (checked with --version), or None when dcmtk is not installed."""
    candidates = [os.path.join(d, name) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for path in dict.fromkeys(candidates + [f"/usr/bin/{name}", f"/usr/local/bin/{name}"]):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


def dicom_files(targets: Iterable[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    for target in map(Path, targets):
        out += sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return out


def storescu_profile(files: Iterable[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Write a storescu ``-xf FILE Router`` profile for ``files`` (non-DICOM files skipped); its path."""
    from pydicom.filereader import read_file_meta_info

    pairs = set()
    for file in files:
        try:
            meta = read_file_meta_info(file)
            pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception:  # noqa: BLE001, S112 - not a DICOM file (README...): storescu skips it too
            continue
    pairs = sorted(pairs)
    if len(pairs) > 128:
        raise ValueError(f"{len(pairs)} SOP class / transfer syntax pairs; one association carries at most 128")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["", "[[PresentationContexts]]", f"[{PROFILE}]"]
    lines += [f"PresentationContext{n + 1} = {sop}\\TS{syntaxes.index(ts)}" for n, (sop, ts) in enumerate(pairs)]
    lines += ["", "[[Profiles]]", f"[{PROFILE}]", f"PresentationContexts = {PROFILE}", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def storescu_command(targets: list[str | os.PathLike], host: str, port: int, profile: str | os.PathLike, *,
                     called: str, calling: str = "STORESCU") -> list[str]:
    """storescu sending files or folders (recursively), each file in its own syntax, not stopping at a failure."""
    tool = find_tool("storescu")
    if tool is None:
        raise FileNotFoundError("dcmtk's storescu is not installed (apt-get install dcmtk)")
    return [tool, "-aec", called, "-aet", calling, "-xf", str(profile), PROFILE, "-nh", "+sd", "+r", host, str(port),
            *map(str, targets)]


def storescp_command(folder: str | os.PathLike, port: int, *, ae_title: str, accept_all: bool = True) -> list[str]:
    """storescp writing what it receives, bit-preserving, into ``folder``."""
    tool = find_tool("storescp")
    if tool is None:
        raise FileNotFoundError("dcmtk's storescp is not installed (apt-get install dcmtk)")
    return [tool, "-aet", ae_title, *(["+xa"] if accept_all else []), "+B", "-od", str(folder), str(port)]


def main(argv: list[str] | None = None) -> int:
    """python -m utils.routing.delivery.dcmtk FILE_OR_FOLDER... --output scu.cfg  (then: storescu -xf scu.cfg Router ...)"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("inputs", nargs="+", help="DICOM files or folders (searched recursively)")
    parser.add_argument("--output", default="storescu.cfg", help="profile file written")
    args = parser.parse_args(argv)
    path = storescu_profile(dicom_files(args.inputs), args.output)
    print(f"wrote {path}: use storescu -xf {path} {PROFILE} ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""README's layout section and the tree say the same thing."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Inner modules documented in their package's own docstring rather than in README's tree.
DOCUMENTED_ELSEWHERE = ("utils/io/dicom/", "utils/routing/")


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def utils_entries() -> tuple[set[str], set[str]]:
    """(module file names, package folder names) under utils/, as the README tree lists them."""
    block = layout_block()
    inside = block.split("\nutils/", 1)[1]
    inside = inside.split("\ndocs/", 1)[0]
    files, folders = set(), set()
    for line in inside.splitlines():  # an entry is the first column: "name.py", "a.py, b.py" or "name/"
        entry = re.match(r"^\s+((?:\w+\.py(?:, )?)+|\w+/)(?:\s|$)", line)
        if entry:
            names = entry.group(1)
            if names.endswith("/"):
                folders.add(names[:-1])
            else:
                files.update(n.strip() for n in names.split(","))
    return files, folders


def test_every_module_of_utils_is_in_the_readme_layout():
    files, folders = utils_entries()
    for path in sorted((ROOT / "utils").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or relative.startswith(DOCUMENTED_ELSEWHERE):
            continue
        assert path.name in files, f"{relative} is missing from README's layout section"
    for folder in sorted(p for p in (ROOT / "utils").iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        assert folder.name in folders, f"utils/{folder.name}/ is missing from README's layout section"


def test_everything_the_readme_layout_names_exists():
    files, folders = utils_entries()
    present = {p.name for p in (ROOT / "utils").rglob("*.py")}
    assert files <= present, f"README names modules that do not exist: {sorted(files - present)}"
    packages = {p.name for p in (ROOT / "utils").rglob("*") if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= packages, f"README names folders that do not exist: {sorted(folders - packages)}"
    for line in layout_block().splitlines():
        top = re.match(r"^(\w+\.py|\w+/)\s", line)
        if top:
            assert (ROOT / top.group(1)).exists(), f"README names {top.group(1)}, which does not exist"

"""README.md, docs/ and the tree stay in step.

- README stays short (a newcomer reads it to the end) and its two quick-start commands are what `.ci/run` runs;
- every entry script and every manual (docs/*.md) is linked from README, and every command README shows parses with
  its script's own flags;
- every relative link (and #anchor) in README.md and docs/*.md resolves;
- every path README names exists, and README's short tree has a line for every room (entry script, top-level
  folder, package of utils/);
- docs/LAYOUT.md lists every module of utils/ and names nothing that does not exist.
"""

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LAYOUT = ROOT / "docs" / "LAYOUT.md"
MAX_README_LINES = 250
# Inner modules documented in their package's own docstring (and their manual) rather than in docs/LAYOUT.md.
DOCUMENTED_ELSEWHERE = ("utils/io/dicom/", "utils/routing/")
DEMO_COMMAND = "pip install -r requirements.txt && python training.py --demo && python test.py --demo"
TEST_COMMAND = "pip install -r requirements-dev.txt && python -m pytest -q"


def readme() -> str:
    return README.read_text()


def section(text: str, heading: str) -> str:
    """The text under `## heading` up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def code_blocks(text: str, language: str = "") -> list[str]:
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
            if not language or lang == language]


def tree_block(path: Path, heading: str) -> str:
    blocks = code_blocks(section(path.read_text(), heading)) if heading else code_blocks(path.read_text())
    assert blocks, f"no tree in {path.name}"
    return blocks[0]


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist, a copied tree)
        return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()]
    return [line for line in out.splitlines() if (ROOT / line).exists()]  # files deleted but not yet committed


def entry_scripts() -> list[str]:
    return sorted(p.name for p in ROOT.glob("*.py") if p.is_file())


def utils_packages() -> list[str]:
    return sorted(p.name for p in (ROOT / "utils").iterdir() if p.is_dir() and (p / "__init__.py").is_file())


# --- README: short, and its two commands -----------------------------------------------------------------------

def test_readme_is_short_enough_to_read_to_the_end():
    lines = readme().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move manual-like text to docs/"


def test_quick_start_gives_the_two_commands():
    blocks = [b.strip() for b in code_blocks(section(readme(), "Quick start"), "bash")]
    assert blocks == [DEMO_COMMAND, TEST_COMMAND]


def test_ci_runs_the_readme_test_command():
    """.ci/run installs what README's test command installs and ends with the same pytest invocation."""
    ci = (ROOT / ".ci" / "run").read_text()
    install, run = TEST_COMMAND.split(" && ")
    requirements = install.split("-r ", 1)[1]
    assert re.search(rf"^python3? -m pip install .*-r {re.escape(requirements)}\s*$", ci, re.M), \
        f".ci/run does not install {requirements}"
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last = commands[-1].split()
    assert last[0] in ("python", "python3") and last[1:] == run.split()[1:], \
        f".ci/run ends with {commands[-1]!r}, README's test command is {run!r}"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_readme_script_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_commands() -> list[list[str]]:
    """Every `python X.py ...` command README shows, in a bash block or in inline code."""
    text = readme()
    pieces = [b.replace("\\\n", " ") for b in code_blocks(text, "bash")]
    pieces += [c for c in re.findall(r"`(python [^`]+)`", text)]
    commands = []
    for piece in pieces:
        for line in piece.splitlines():
            line = line.split(" #", 1)[0]
            for command in line.split("&&"):
                words = shlex.split(command)
                if len(words) >= 2 and words[0] in ("python", "python3") and words[1].endswith(".py"):
                    if not Path(words[1]).stem.isupper():  # `python X.py --help`: a placeholder
                        commands.append(words[1:])
    return commands


def test_readme_has_a_command_for_each_workflow():
    scripts = {words[0] for words in readme_commands()}
    assert {"training.py", "test.py", "prepare.py", "predict.py", "backfill.py", "router.py"} <= scripts


@pytest.mark.parametrize("words", readme_commands(), ids=lambda words: " ".join(words)[:60])
def test_every_readme_command_parses_with_its_script_flags(words):
    """A renamed flag breaks README's commands; parse each with the script's own parser (nothing runs)."""
    assert (ROOT / words[0]).is_file(), f"README runs {words[0]}, which does not exist"
    module = _load_script(words[0])
    try:
        module.parse_args(words[1:])
    except SystemExit as exit_:
        pytest.fail(f"README's `python {' '.join(words)}` is refused by {words[0]} (exit {exit_.code})")


# --- README links --------------------------------------------------------------------------------------------

def markdown_links(text: str) -> list[str]:
    """Targets of [text](target) and ![alt](target), outside code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def test_every_entry_script_is_linked_from_the_readme():
    links = set(markdown_links(readme()))
    missing = [name for name in entry_scripts() if name not in links]
    assert not missing, f"README does not link {missing}"


def test_every_manual_is_linked_from_the_readme():
    """Every docs/*.md (other files of docs/, such as the alert rules, are linked from the manuals that use them)."""
    links = {link.split("#", 1)[0] for link in markdown_links(readme())}
    docs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert docs
    missing = [d for d in docs if d not in links]
    assert not missing, f"README does not link {missing}"


def github_slugs(markdown: str) -> set[str]:
    """Anchors GitHub makes of a file's headings (lower case, punctuation dropped, spaces -> '-', -1 for repeats)."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    slugs, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document):
    broken = []
    for link in markdown_links(document.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (document.parent / path).resolve() if path else document
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in github_slugs(target.read_text()):
            broken.append(f"{link} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not broken, f"{document.relative_to(ROOT)}: broken links {broken}"


# --- README paths and its short tree ------------------------------------------------------------------------

def tree_entries(block: str) -> tuple[list[str], set[str], set[str]]:
    """(top-level names, module file names under utils/, package folder names under utils/) of a tree."""
    tops, files, folders = [], set(), set()
    in_utils = False
    for line in block.splitlines():
        top = re.match(r"^([\w.-]+(?:/[\w.-]+)*/?)(?:\s|$)", line)
        if top:
            tops.append(top.group(1))
            in_utils = top.group(1) == "utils/"
            continue
        entry = re.match(r"^\s+((?:\w+\.py(?:, )?)+|\w+/)(?:\s|$)", line)  # "name.py", "a.py, b.py" or "name/"
        if in_utils and entry:
            names = entry.group(1)
            if names.endswith("/"):
                folders.add(names[:-1])
            else:
                files.update(n.strip() for n in names.split(","))
    return tops, files, folders


def test_readme_tree_has_a_line_for_every_room():
    tops, _, folders = tree_entries(tree_block(README, "Layout"))
    for script in entry_scripts():
        assert script in tops, f"{script} is missing from README's layout"
    top_dirs = {f.split("/", 1)[0] + "/" for f in tracked_files() if "/" in f and not f.startswith(".")}
    missing = sorted(top_dirs - set(tops))
    assert not missing, f"top-level folders missing from README's layout: {missing}"
    missing = sorted(set(utils_packages()) - folders)
    assert not missing, f"packages of utils/ missing from README's layout: {missing}"


def test_everything_the_readme_names_exists():
    tops, files, folders = tree_entries(tree_block(README, "Layout"))
    for name in tops:
        assert (ROOT / name).exists(), f"README's layout names {name}, which does not exist"
    for folder in folders:
        assert (ROOT / "utils" / folder / "__init__.py").is_file(), f"README's layout names utils/{folder}/"
    for name in files:
        assert (ROOT / "utils" / name).is_file(), f"README's layout names utils/{name}, which does not exist"
    # paths in inline code and in the tree's descriptions: files of the repository (not outputs such as runs/)
    text = readme()
    named = re.findall(r"(?<![\w/.<-])((?:utils|docs|bench|fuzz|models|tests|\.ci)/[\w./-]*\w/?|data/README\.md)", text)
    missing = sorted({n for n in named if not (ROOT / n).exists()})
    basenames = {Path(f).name for f in tracked_files()}  # `constants.py`: a file of that name somewhere
    missing += sorted({n for n in re.findall(r"`([\w-]+\.(?:py|txt|yaml|md))`", text) if n not in basenames})
    assert not missing, f"README names paths that do not exist: {missing}"


# --- docs/LAYOUT.md: every module ------------------------------------------------------------------------------

def test_every_module_of_utils_is_in_docs_layout():
    _, files, folders = tree_entries(tree_block(LAYOUT, ""))
    for path in sorted((ROOT / "utils").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or relative.startswith(DOCUMENTED_ELSEWHERE):
            continue
        assert path.name in files, f"{relative} is missing from docs/LAYOUT.md"
    for folder in utils_packages():
        assert folder in folders, f"utils/{folder}/ is missing from docs/LAYOUT.md"


def test_everything_docs_layout_names_exists():
    tops, files, folders = tree_entries(tree_block(LAYOUT, ""))
    present = {p.name for p in (ROOT / "utils").rglob("*.py")}
    assert files <= present, f"docs/LAYOUT.md names modules that do not exist: {sorted(files - present)}"
    packages = {p.name for p in (ROOT / "utils").rglob("*") if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= packages, f"docs/LAYOUT.md names folders that do not exist: {sorted(folders - packages)}"
    for name in tops:
        assert (ROOT / name).exists(), f"docs/LAYOUT.md names {name}, which does not exist"

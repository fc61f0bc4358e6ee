"""The documentation points at what exists: every relative link in README.md, docs/*.md and models/*/notes.md
reaches a file (and a heading, where it names an anchor), every repository path and `shared.x.y` name they
put in backticks exists, and the README stays a front door. Plain text parsing, no TensorFlow: fast."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "models").glob("*/notes.md"))]

# Paths of other projects that a page quotes: BVLC Caffe's GoogLeNet solver, not a file of this repository.
OTHER_PROJECTS = {"models/bvlc_googlenet/solver.prototxt"}
REPO_PREFIXES = ("shared/", "models/", "scripts/", "tests/", "docs/")

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
DOTTED = re.compile(r"shared(?:\.[A-Za-z_]\w*)+")


def prose(text: str) -> str:
    """The text outside fenced code blocks (a command's arguments there are examples, not links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    names = set()
    for match in HEADING.finditer(prose(page.read_text(encoding="utf-8"))):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.add(base if count == 0 else f"{base}-{count}")  # GitHub numbers repeated headings
    return frozenset(names)


def link_problems(page: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not this repository's
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            problems.append(f"{page.name}: link {target}: no file {path_part}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{page.name}: link {target}: no heading #{anchor} in {destination.name}")
    return problems


@cache
def top_level_names(module: Path) -> dict[str, ast.AST]:
    """The names a module defines at its top level (functions, classes, assignments, imports)."""
    names: dict[str, ast.AST] = {}
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = node
    return names


def class_members(node: ast.ClassDef) -> set[str]:
    members = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members.add(item.target.id)
        elif isinstance(item, ast.Assign):
            members.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return members


def dotted_problem(name: str, root: Path) -> str | None:
    """Why `shared.x.y[.attr[.member]]` names nothing in the sources under `root`, or None when it does."""
    parts = name.split(".")
    module = None
    for end in range(len(parts), 0, -1):  # the longest prefix that is a module or a package
        base = root.joinpath(*parts[:end])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                module, rest = candidate, parts[end:]
                break
        if module:
            break
    if module is None:
        return f"no module {name}"
    if not rest:
        return None
    node = top_level_names(module).get(rest[0])
    if node is None:
        return f"{module.relative_to(root)} defines no {rest[0]}"
    if len(rest) > 1 and isinstance(node, ast.ClassDef) and rest[1] not in class_members(node):
        return f"class {rest[0]} in {module.relative_to(root)} has no {rest[1]}"
    return None


def named_paths(text: str) -> tuple[list[str], list[str]]:
    """The repository paths and the dotted `shared...` names that backticked spans name."""
    paths, modules = [], []
    for span in INLINE_CODE.findall(text):
        for token in span.split():
            token = token.strip("'\",;:()[]")
            if token.startswith(REPO_PREFIXES):
                if not re.search(r"[<>*{}|]|\.\.\.", token):  # templates and globs name no one file
                    paths.append(token)
            elif (match := DOTTED.match(token)) and not token.startswith("shared.x"):
                modules.append(match.group(0))
    return paths, modules


def path_problems(page: Path, text: str, root: Path = REPO) -> list[str]:
    paths, modules = named_paths(text)
    problems = [f"{page.name}: `{path}` does not exist" for path in paths
                if path not in OTHER_PROJECTS and not (root / path.rstrip("/")).exists()]
    for name in modules:
        why = dotted_problem(name, root)
        if why:
            problems.append(f"{page.name}: `{name}`: {why}")
    return problems


def page_problems(page: Path, root: Path = REPO) -> list[str]:
    text = prose(page.read_text(encoding="utf-8"))
    return link_problems(page, text) + path_problems(page, text, root)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_link_and_named_path_resolves(page):
    problems = page_problems(page)
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_the_pages_exist():
    names = {page.relative_to(REPO).as_posix() for page in PAGES}
    assert {"docs/architecture.md", "docs/testing.md", "models/resnet/notes.md"} <= names


def test_a_broken_link_a_missing_anchor_or_path_and_a_stale_name_are_reported(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("")
    (tmp_path / "shared" / "runs.py").write_text("class Run:\n    def checkpoint(self): ...\n\ndef open_run(): ...\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Data sources\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md#data-sources) [here](#page) [web](https://example.com/x.md)\n"
        "`shared/runs.py`, `shared.runs.Run.checkpoint`, `shared.runs.open_run()`, `models/<name>/`\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-heading)\n"
        "`shared/gone.py --flag`, `shared.runs.close_run`, `shared.runs.Run.resume`, `shared.nothing`\n"
        "```sh\n[in code](nowhere.md) `scripts/not_checked.sh`\n```\n")
    problems = page_problems(page, tmp_path)
    assert problems == [
        "page.md: link missing.md: no file missing.md",
        "page.md: link other.md#no-such-heading: no heading #no-such-heading in other.md",
        "page.md: `shared/gone.py` does not exist",
        "page.md: `shared.runs.close_run`: shared/runs.py defines no close_run",
        "page.md: `shared.runs.Run.resume`: class Run in shared/runs.py has no resume",
        "page.md: `shared.nothing`: shared/__init__.py defines no nothing",
    ]


def test_anchors_follow_github():
    assert slug("Detection: classification backbones feed a single-shot detector") == \
        "detection-classification-backbones-feed-a-single-shot-detector"
    assert slug("Architecture (`model.py`)") == "architecture-modelpy"
    assert slug("Mistakes, names and Unicode") == "mistakes-names-and-unicode"

"""The README and docs stay true to the code: every setting is documented, every link resolves.

Settings: every environment variable the code reads (through the typed settings reader,
`os.environ` or `os.getenv` in the apps, `${NAME:-default}` in the scripts, `NAME ?=` in
the Makefile) must appear in a table of the README's *Configuration* section, and every
variable those tables name must still be read somewhere (the test suite included, for the
test knobs). Links: every Markdown link in README.md, CHANGELOG.md and docs/*.md points at a
file or directory inside the repository (and at a heading that exists, for `#anchors`);
none points at another site or outside the checkout.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from watasu.settings.env import Env

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("watasu", "sandboxes", "templates_app", "teams")
ENV_READERS = {name for name in vars(Env) if not name.startswith("_")}
SCRIPT_READ = re.compile(r"\$\{([A-Z][A-Z0-9_]*):[-=]")
MAKE_READ = re.compile(r"^([A-Z][A-Z0-9_]*)\s*\?=", re.MULTILINE)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_os_environ(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def _read_name(node: ast.AST) -> str | None:
    """The variable a call or subscript reads: `env.int("X", ...)`, `os.environ.get("X")`,
    `os.environ.setdefault("X", ...)`, `os.getenv("X")`, `os.environ["X"]`."""
    if isinstance(node, ast.Subscript) and _is_os_environ(node.value):
        return _literal(node.slice)
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute)):
        return None
    func, first = node.func, _literal(node.args[0])
    owner = func.value
    if isinstance(owner, ast.Name) and owner.id == "env" and func.attr in ENV_READERS:
        return first
    if _is_os_environ(owner) and func.attr in ("get", "setdefault"):
        return first
    if isinstance(owner, ast.Name) and owner.id == "os" and func.attr == "getenv":
        return first
    return None


def python_reads(directory: Path) -> set[str]:
    names: set[str] = set()
    for path in directory.rglob("*.py"):
        # the provider templates' programs run inside sandboxes: they read the guest's
        # environment, not the platform's settings (their pages document them)
        if "migrations" in path.parts or path.is_relative_to(ROOT / "templates_app/provider/guest"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = _read_name(node)
            if name:
                names.add(name)
    return names


def code_reads() -> set[str]:
    names: set[str] = set()
    for directory in CODE_DIRS:
        names |= python_reads(ROOT / directory)
    for script in (ROOT / "scripts").iterdir():
        names |= set(SCRIPT_READ.findall(script.read_text()))
    names |= set(MAKE_READ.findall((ROOT / "Makefile").read_text()))
    return names


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end == -1 else text[start:end]


def documented_settings() -> set[str]:
    """Backticked names in the first column of the Configuration section's tables."""
    names: set[str] = set()
    for line in readme_section("Configuration").splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    return names


def test_every_setting_the_code_reads_is_in_the_readme_table():
    # given every variable read by the apps, the scripts and the Makefile
    read = code_reads()
    # then each has a row in the README's Configuration tables
    assert sorted(read - documented_settings()) == []


def test_every_setting_in_the_readme_table_is_read_somewhere():
    # given the names the README documents
    documented = documented_settings()
    # then the code (or, for the test knobs, the test suite) still reads each of them
    read = code_reads() | python_reads(ROOT / "tests")
    assert sorted(documented - read) == []


def test_the_settings_scan_finds_each_kind_of_read():
    # the scan itself: one read of each kind it claims to find (so the tests above cannot
    # pass by finding nothing)
    read = code_reads()
    assert {"WATASU_DATA_DIR", "DATABASE_URL", "REDIS_URL"} <= read  # env.path / env.database / env.redis_url
    assert {"WATASU_AGENT_PORT", "DJANGO_SETTINGS_MODULE"} <= read  # os.environ.get / setdefault
    assert {"PORT", "HOST"} <= read  # ${PORT:=8000} in scripts/run-embedded
    assert {"TEST_DATA_DIR", "STRESS_RUNS"} <= read  # Makefile ?=


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def link_problems(text: str, source: Path) -> list[str]:
    """What is wrong with the links of `text`, read as if it were the page at `source`."""
    problems = []
    for target in LINK.findall(text):
        where = f"{source.relative_to(ROOT)} -> {target}"
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
            problems.append(f"{where}: points outside the repository")
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (source.parent / path_part).resolve() if path_part else source
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{where}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: no such file")
        elif (
            fragment
            and resolved.suffix == ".md"
            and fragment not in {anchor(h) for h in HEADING.findall(resolved.read_text())}
        ):
            problems.append(f"{where}: no such heading")
    return problems


def test_docs_exist_and_link_only_to_files_in_the_repo():
    # given the README, the changelog and every page under docs/
    files = markdown_files()
    assert all(path.is_file() for path in files)
    # then every link resolves to a file (or heading) inside this checkout
    assert [problem for path in files for problem in link_problems(path.read_text(), path)] == []


def test_the_readme_links_every_page_under_docs():
    # given the docs pages
    pages = {f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")}
    # then the README links each of them
    linked = set(LINK.findall((ROOT / "README.md").read_text()))
    assert sorted(pages - linked) == []


def test_the_link_check_refuses_what_it_should():
    # given a page under docs/ with one bad link of each kind, and one good one
    text = (
        "[a](https://example.com) [b](../../shared/DESIGN.md) [c](missing.md) "
        "[d](runtime.md#no-such-heading) [e](runtime.md#figures) [f](../README.md)"
    )
    # when its links are checked
    problems = link_problems(text, ROOT / "docs" / "page.md")
    # then each bad one is named, and only those
    assert problems == [
        "docs/page.md -> https://example.com: points outside the repository",
        "docs/page.md -> ../../shared/DESIGN.md: points outside the repository",
        "docs/page.md -> missing.md: no such file",
        "docs/page.md -> runtime.md#no-such-heading: no such heading",
    ]

"""The project around the code: README, CI, changelog, packaging metadata.

These pin what a new user relies on before reading any code: the README's
test command is the one CI runs, its examples are the files in examples/
(which tests/test_examples.py runs), and the package needs nothing outside
the standard library at run time.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' "
                "&& .venv/bin/python -m pytest -n 4")
# The suite on the other interpreters CI tests (tools/pythons finds or builds them).
PYTHONS_COMMAND = "tools/test-pythons 3.13 3.13t"
MACHINE_PYTHON = "3.11"  # what TEST_COMMAND's python3 is, on this project's machines
MAIN_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -e . "
                "&& .venv/bin/python -m anyfork bench --quick")


def _shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"^```(?:sh|bash|shell|console)\n(.*?)^```", text, re.M | re.S)]


def test_readme_test_command_is_what_ci_runs() -> None:
    assert TEST_COMMAND in README.splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci.splitlines()


def test_readme_multi_python_command_is_what_ci_runs() -> None:
    assert PYTHONS_COMMAND in README.splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert PYTHONS_COMMAND in ci.splitlines()
    for tool in ("tools/pythons", "tools/test-pythons"):
        assert os.access(ROOT / tool, os.X_OK), f"{tool} is not executable"


def test_readme_gives_exactly_three_setup_commands() -> None:
    # One that installs and runs the main job, one that installs and runs
    # the whole test suite, one that runs it on the other Pythons; nothing
    # else to type on a fresh machine.
    assert _shell_blocks(README) == [MAIN_COMMAND, TEST_COMMAND, PYTHONS_COMMAND]


def _supported_pythons() -> dict[str, str]:
    """README's "Supported Pythons" table: each Python's "Tested in CI" cell."""
    section = re.search(r"^## Supported Pythons\n(.*?)^## ", README, re.M | re.S)
    assert section, "README has no Supported Pythons section"
    rows = re.findall(r"^\| (.+?) \| (.+?) \| (.+?) \|", section.group(1), re.M)
    assert rows[0] == ("Python", "Build", "Tested in CI")
    tested = {}
    for names, builds, cell in rows[2:]:
        for name, build in zip(names.split(", "), builds.split(", "), strict=True):
            assert re.fullmatch(r"3\.\d+t?", name), name
            assert build == ("free-threaded" if name.endswith("t") else "GIL"), (name, build)
            tested[name] = cell
    return tested


def test_readme_python_table_is_what_ci_runs() -> None:
    table = _supported_pythons()
    assert set(table.values()) <= {"yes", "no"}
    in_ci = {MACHINE_PYTHON, *(w for w in PYTHONS_COMMAND.split()[1:] if not w.startswith("-"))}
    assert {name for name, cell in table.items() if cell == "yes"} == in_ci


def test_requires_python_is_the_oldest_python_tested() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    floor = re.search(r'^requires-python = ">=(3\.\d+)"$', text, re.M)
    assert floor, "requires-python is not a plain lower bound"
    tested = [name for name, cell in _supported_pythons().items() if cell == "yes"]
    assert floor.group(1) == min(tested, key=lambda v: tuple(map(int, v.rstrip("t").split("."))))


def _strip_docstring(source: str) -> str:
    """The source without its module docstring (and the blank lines after it)."""
    module = ast.parse(source)
    if ast.get_docstring(module, clean=False) is not None:
        end = module.body[0].end_lineno
        source = "".join(source.splitlines(keepends=True)[end:])
    return source.lstrip("\n")


def test_readme_examples_are_the_example_files() -> None:
    blocks = re.findall(r"^```python\n# (examples/\S+\.py)\n(.*?)^```", README, re.M | re.S)
    shown = dict(blocks)
    assert len(shown) == len(blocks), "an example is shown twice"
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.py"))
    assert sorted(shown) == files
    for name, code in shown.items():
        assert code == _strip_docstring((ROOT / name).read_text(encoding="utf-8")), (
            f"README's {name} differs from the file")


def test_readme_has_the_promised_sections() -> None:
    headings = re.findall(r"^## (.+)$", README, re.M)
    for section in ("Why", "Set up", "Quick tour", "API in brief", "Design", "Guarantees",
                    "Typical problems", "Portability", "Supported Pythons"):
        assert section in headings


def test_changelog_has_an_unreleased_section() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(r"^## \[?Unreleased\]?\s*$", changelog, re.M | re.I)


def _runtime_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: no tomllib; the key is simple enough to find
        match = re.search(r"^\[project\]$(.*?)^\[", text, re.M | re.S)
        assert match, "pyproject.toml has no [project] table"
        deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", match.group(1), re.M | re.S)
        assert deps, "[project] has no dependencies key"
        return re.findall(r"[\"']([^\"']+)[\"']", deps.group(1))
    project = tomllib.loads(text)["project"]
    assert "dependencies" in project
    return list(project["dependencies"])


def test_no_runtime_dependencies() -> None:
    assert _runtime_dependencies() == []


def test_package_is_typed() -> None:
    assert (ROOT / "src" / "anyfork" / "py.typed").is_file()

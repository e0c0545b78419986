"""The project around the code: README, CI, changelog, packaging metadata.

These pin what a new user relies on before reading any code: the README's
test command is the one CI runs, its examples are the files in examples/
(which tests/test_examples.py runs), and the package needs nothing outside
the standard library at run time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest"
MAIN_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -e . "
                "&& .venv/bin/python -m anyfork bench --quick")


def _shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"^```(?:sh|bash|shell|console)\n(.*?)^```", text, re.M | re.S)]


def test_readme_test_command_is_what_ci_runs() -> None:
    assert TEST_COMMAND in README.splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci.splitlines()


def test_readme_gives_exactly_two_setup_commands() -> None:
    # One that installs and runs the main job, one that installs and runs
    # the whole test suite; nothing else to type on a fresh machine.
    assert _shell_blocks(README) == [MAIN_COMMAND, TEST_COMMAND]


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
                    "Typical problems", "Portability"):
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

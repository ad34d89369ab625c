"""The repository documents itself (issue 19 item 6): every "§N" / "DESIGN §N" in the package, the
benchmarks, scripts, tests, C++/CUDA sources, the README and the command-line help names a section
that exists in ``docs/design.md``, and nothing the product prints names a design file other than
``docs/design.md`` (a user who installs or clones the project has that file, and no other).

"Printed" means: every help text of ``ursa-engine`` and its subcommands (the real parser), every
string constant of the package, benchmarks and scripts that is not a docstring (messages, help
strings, labels written into result JSON), and the module docstrings that an ``ArgumentParser``
prints as its description (the part it prints: the ``description=`` expression is evaluated).
Result JSON already written under ``benchmarks/results/`` is a historical record and is not read.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "design.md"
DOC_PATH = "docs/design.md"

# "§2.4", "§ 6", "§2.3–§2.5", "§2.3-2.5": both ends of a range are references
REF = re.compile(r"§\s?(\d+(?:\.\d+)*)(?:\s?[-–]\s?§?(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
# the old name of the design file (upper case), spelled so that this file does not contain it
OLD_NAME = "DESIGN" + ".md"

SOURCE_DIRS = ("ursa_engine", "triton_kernels", "benchmarks", "scripts", "tests", "csrc", "docs")
SOURCE_SUFFIXES = {".py", ".md", ".cpp", ".cu", ".cuh", ".h", ".txt", ".toml", ".cfg"}
TOP_FILES = ("README.md", "setup.py", "pyproject.toml", "CMakeLists.txt", "Makefile")
PRINTING_DIRS = ("ursa_engine", "triton_kernels", "benchmarks", "scripts")


# ----------------------------------------------------------------------------------- helpers
def doc_sections(text: str) -> set[str]:
    """Section numbers of the numbered headings of a markdown text (``## 2.`` -> "2", ``### 2.4`` -> "2.4")."""
    return set(HEADING.findall(text))


def references(text: str) -> list[tuple[int, str]]:
    """(line, section) of every § reference in ``text``."""
    out = []
    for m in REF.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.extend((line, s) for s in m.groups() if s)
    return out


def dangling(text: str, sections: set[str]) -> list[tuple[int, str]]:
    """The references of ``text`` that name no section of ``sections``."""
    return [(line, s) for line, s in references(text) if s not in sections]


def printed_problems(text: str) -> list[str]:
    """Why a printed text points at a file the user does not have (empty: it does not)."""
    flat = " ".join(text.split())  # help texts wrap anywhere
    problems = []
    if re.search(r"\bDESIGN\b", flat):
        problems.append("says 'DESIGN' (print the path: docs/design.md §N)")
    for m in re.finditer(r"(\S*?)design\.md", flat, flags=re.IGNORECASE):
        if not m.group(0).endswith(DOC_PATH):
            problems.append(f"names {m.group(0)!r}, not {DOC_PATH}")
    if "§" in flat and DOC_PATH not in flat:
        problems.append(f"cites a § without naming {DOC_PATH}")
    return problems


def source_files() -> list[Path]:
    files = [ROOT / name for name in TOP_FILES if (ROOT / name).is_file()]
    for d in SOURCE_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts:
                files.append(p)
    return files


def python_files(dirs=PRINTING_DIRS) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _printed_descriptions(tree: ast.Module) -> list[tuple[int, str]]:
    """What ``ArgumentParser(description=<expression of __doc__>)`` prints, evaluated on the module docstring."""
    doc = ast.get_docstring(tree, clean=False)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name != "ArgumentParser":
            continue
        for kw in node.keywords:
            uses_doc = any(isinstance(n, ast.Name) and n.id == "__doc__" for n in ast.walk(kw.value))
            if kw.arg in ("description", "epilog") and uses_doc and doc is not None:
                expr = ast.Expression(kw.value)
                text = eval(compile(expr, "<description>", "eval"), {"__builtins__": {}}, {"__doc__": doc})
                out.append((node.lineno, str(text)))
    return out


def printed_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the strings of a module that can reach a user: non-docstring constants
    (f-string parts included) and docstrings printed as an argparse description."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docs = _docstring_nodes(tree)
    out = [(node.lineno, node.value) for node in ast.walk(tree)
           if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]
    return out + _printed_descriptions(tree)


def help_texts(parser: argparse.ArgumentParser, name: str = "ursa-engine"):
    """(command, help text) of a parser and every subcommand below it."""
    yield name, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from help_texts(subparser, f"{name} {sub}")


@pytest.fixture(scope="module")
def sections() -> set[str]:
    assert DOC.is_file(), f"{DOC_PATH} is missing: the § references of the code point there"
    return doc_sections(DOC.read_text(encoding="utf-8"))


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ------------------------------------------------------------------------------------- tests
def test_design_doc_has_the_numbered_sections(sections):
    expected = {str(n) for n in range(1, 10)} | {f"2.{n}" for n in range(1, 6)}
    assert expected <= sections, f"{DOC_PATH} lacks sections {sorted(expected - sections)}"


def test_every_section_reference_exists_in_design_doc(sections):
    bad = []
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        bad += [f"{_rel(path)}:{line}: §{s}" for line, s in dangling(text, sections)]
    assert not bad, f"references to sections that {DOC_PATH} does not have:\n" + "\n".join(bad)


def test_nothing_names_the_old_design_file():
    bad = [f"{_rel(p)}:{i}" for p in source_files() if p != Path(__file__).resolve()
           for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if OLD_NAME in line]
    assert not bad, f"{OLD_NAME} is not in the repository; point at {DOC_PATH}:\n" + "\n".join(bad)


def test_readme_points_at_the_design_doc():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert DOC_PATH in text


def test_cli_help_cites_docs_design_md_only(sections, monkeypatch):
    from ursa_engine.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping, whole sentences per line
    bad, seen = [], 0
    for command, text in help_texts(build_parser()):
        seen += 1
        bad += [f"{command} --help: {p}" for p in printed_problems(text)]
        bad += [f"{command} --help: §{s} is not a section of {DOC_PATH}" for _, s in dangling(text, sections)]
    assert seen >= 6, "the walk found too few subcommands"
    assert not bad, "\n".join(bad)


def test_printed_strings_cite_docs_design_md_only(sections):
    bad = []
    for path in python_files():
        for line, text in printed_strings(path):
            bad += [f"{_rel(path)}:{line}: {p}: {text[:80]!r}" for p in printed_problems(text)]
            bad += [f"{_rel(path)}:{line}: §{s} is not a section of {DOC_PATH}" for _, s in dangling(text, sections)]
    assert not bad, "\n".join(bad)


def test_checks_flag_what_they_should():
    secs = doc_sections("# Title\n## 1. One\n### 1.2 Sub\n## 2. Two\n")
    assert secs == {"1", "1.2", "2"}
    sign = "§"
    assert dangling(f"see {sign}1.2 and {sign}2, {sign}1-{sign}2", secs) == []
    assert dangling(f"a\nsee {sign}1.3 and {sign}1.2–3", secs) == [(2, "1.3"), (2, "3")]
    assert printed_problems(f"the contract ({DOC_PATH} {sign}1.2)") == []
    assert printed_problems("no reference at all") == []
    assert printed_problems("DESIGN" + f" {sign}6 real shapes")  # the word, and a § with no path
    assert printed_problems(f"see {OLD_NAME}")
    assert printed_problems(f"see design.md {sign}2")  # a path the user does not have
    assert printed_problems(f"({sign}4)")  # a bare § in printed text: which document?


def test_printed_strings_are_found(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text('"""Tool (DOC §9).\n\nMore."""\nimport argparse\n'
                   'def f():\n    """doc §1"""\n    raise ValueError(f"x: bad (§4) {1}")\n'
                   'p = argparse.ArgumentParser(description=__doc__.split("\\n\\n")[0])\n', encoding="utf-8")
    texts = [t for _, t in printed_strings(mod)]
    assert "x: bad (§4) " in texts  # the f-string's constant part
    assert "Tool (DOC §9)." in texts  # the printed first paragraph of the module docstring
    assert "doc §1" not in texts  # a function docstring is not printed

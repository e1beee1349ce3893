"""ARCHITECTURE.md read against the code: every module is on the map, every symbol the equation table names exists,
and the map's stated rules hold (stage constants in one place, short functions in qvlm/quant, model-family names in
the layer map only).

Why a test: a map that drifts misleads faster than no map (issue 31 found 18 modules missing and three rules the code
broke). ``QVLM_MAP_ROOT`` points these checks at another checkout (an older commit, to see them fail there).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("QVLM_MAP_ROOT") or Path(__file__).resolve().parents[1])
PACKAGE = ROOT / "qvlm"
MAP = ROOT / "ARCHITECTURE.md"
MAX_FUNCTION_LINES = 80
FAMILY_NAMES = ("input_layernorm", "post_attention_layernorm", "layer_norm1", "layer_norm2")
"""Submodule names that differ between model families (LLaMA/Qwen2 vs CLIP/SigLIP): only the layer map spells them."""


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def _defined(path: Path) -> set[str]:
    """Top-level functions and classes of ``path``, and methods as ``Class.method``."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_module_of_the_package_is_on_the_map():
    text = MAP.read_text()
    missing = [str(p.relative_to(ROOT)) for p in _modules() if f"{p.name}`" not in text and p.stem not in ("cli",)]
    assert not missing, f"modules ARCHITECTURE.md does not name: {missing}"


def test_every_symbol_the_equation_table_names_exists_where_it_says():
    text = MAP.read_text()
    table = text[text.index("## Where each equation lives"):text.index("## Code map")]
    rows = [line for line in table.splitlines() if re.match(r"\| *\d+ *\|", line)]
    assert len(rows) >= 10, "the equation table (Eqs. 1-10) is gone"
    wrong = []
    for row in rows:
        # "`a`, `b` in `qvlm/x.py`": each run of symbols lives in the file that follows it
        for symbols, file in re.findall(r"((?:`[\w.]+`(?:, | and )?)+) in `(qvlm/[\w/]+\.py)`", row):
            path = ROOT / file
            defined = _defined(path) if path.is_file() else set()
            wrong += [f"{n} in {file}" for n in re.findall(r"`([\w.]+)`", symbols) if n not in defined]
    assert not wrong, f"the equation table names what is not there: {wrong}"


def test_stage_constants_live_in_utils_progress():
    outside = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _modules() if p.name != "progress.py"
               for m in re.finditer(r"^STAGE_[A-Z_]+ *= *[\"']", p.read_text(), flags=re.M)]
    assert not outside, f"stage constants outside qvlm/utils/progress.py: {outside}"


def test_functions_in_quant_are_short():
    long = []
    for path in (PACKAGE / "quant").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in qvlm/quant: {long}"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_model_family_names_are_spelled_in_the_layer_map_only(name):
    where = [str(p.relative_to(ROOT)) for p in _modules()
             if p.name != "layer_map.py" and re.search(rf"[\"']{name}[\"']", p.read_text())]
    assert not where, f"{name!r} spelled outside qvlm/models/layer_map.py: {where}"


def test_test_folders_mirror_the_code():
    """A test lives beside the code it tests: tests/quant for qvlm/quant, tests/training for training/, ..."""
    tests = ROOT / "tests"
    code = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} | {"training", "benchmarks"}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))} - {"e2e"}
    assert folders, "tests/ has no sub-folders"
    assert folders <= code, f"test folders with no code of that name: {sorted(folders - code)}"
    loose = sorted(p.name for p in tests.glob("test_*.py")
                   if p.stem not in {"test_architecture", "test_architecture_map", "test_cli"})
    assert not loose, f"tests at the top of tests/ that belong in a package folder: {loose}"

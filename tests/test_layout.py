"""The code's shape stays as README's Layout section describes: one-way imports, small modules and functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "sit_atconv").rglob("*.py"))
CLIS = [ROOT / name for name in ("train.py", "sample.py", "eval_fid.py")]
MAX_MODULE, MAX_FUNCTION, MAX_CLI = 400, 60, 100
LONG_OK = "# long function:"  # a comment on the line above `def` that says why it may be longer


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml (layers, pure math, pure models, task-agnostic loop)."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def _long_functions(path: Path) -> list[str]:
    """'name (N lines)' of each function over MAX_FUNCTION lines without a reason comment above it."""
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION and not lines[first - 2].strip().startswith(LONG_OK):
                out.append(f"{node.name} ({length} lines)")
    return out


@pytest.mark.parametrize("path", SOURCES + CLIS, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    limit = MAX_CLI if path in CLIS else MAX_MODULE
    assert len(path.read_text().splitlines()) <= limit, f"{path.name} is over {limit} lines: split it"
    assert not _long_functions(path), f"over {MAX_FUNCTION} lines without a '{LONG_OK}' reason"


def test_the_size_check_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION + 1))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert _long_functions(tmp_path / "m.py") == [f"f ({MAX_FUNCTION + 2} lines)"]
    (tmp_path / "m.py").write_text(f"{LONG_OK} a table\ndef f():\n{body}\n")
    assert _long_functions(tmp_path / "m.py") == []

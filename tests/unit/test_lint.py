"""The repository passes ruff with the configuration in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_check_passes():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed; install the test extra: pip install -e '.[test]'")
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def top_level_imports(package: str) -> dict[str, set[str]]:
    """Each module of a package: the top-level packages it imports at module level (not inside functions)."""
    import ast

    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        found: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = found
    return out


def test_dependency_rules_of_the_architecture():
    """ARCHITECTURE.md's import rules: the two services never import each other; the client library needs
    only grpc and the generated code (clients/tls.py, which both services share, included); the scheduler and
    block manager are pure Python."""
    for module, imported in top_level_imports("engine_service").items():
        assert "tokenizer_service" not in imported, f"{module} imports the tokenizer service"
    for module, imported in top_level_imports("tokenizer_service").items():
        assert "engine_service" not in imported, f"{module} imports the engine service"
    allowed = set(sys.stdlib_module_names) | {"grpc", "grpc_health", "protos", "clients"}
    for module, imported in top_level_imports("clients").items():
        assert imported <= allowed, f"{module} imports {sorted(imported - allowed)} at module level"
    for module in ("engine_service/scheduler.py", "engine_service/block_manager.py", "engine_service/sequence.py"):
        imported = top_level_imports("engine_service")[module]
        assert not imported & {"torch", "grpc"}, f"{module} imports {sorted(imported & {'torch', 'grpc'})}"

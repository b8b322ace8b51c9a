"""The package's public face: what `gateway` exports, and that nobody reaches past it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gateway

REPO = Path(__file__).resolve().parent.parent


def test_every_exported_name_resolves_to_gateway_code() -> None:
    for name in gateway.__all__:
        exported = getattr(gateway, name)
        if name != "__version__":
            assert exported.__module__.startswith("gateway."), name


def test_importing_the_package_loads_no_heavy_dependency() -> None:
    """The CLI's --help and check-config start fast on a Pi: imports are lazy."""
    probe = "import sys, gateway; print(sorted(m for m in ('paho', 'httpx', 'aiosqlite') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def private_imports(path: Path) -> list[str]:
    """`from gateway.x import _name` anywhere: a private name used outside its module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
            for alias in node.names:
                if alias.name.startswith("_") and alias.name != "__version__":
                    found.append(
                        f"{path.relative_to(REPO)}:{node.lineno} {node.module}.{alias.name}"
                    )
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    files = [*REPO.glob("gateway/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py")]
    offenders = [hit for path in files for hit in private_imports(path)]
    assert offenders == []

"""The layout's rules (README "Layout"), checked on the source so a new import cannot
quietly break them: the upload and ingest sides know nothing of operations, and only the
CLI (and the lazy public face) reaches the composition root."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
SHARED_ROOT_MODULES = {"aio", "app", "clock", "config", "errors", "log", "models", "sampling"}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at top level, inside functions or under TYPE_CHECKING."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_under(*parts: str) -> list[Path]:
    return sorted(PACKAGE.joinpath(*parts).rglob("*.py"))


def offenders(files: list[Path], forbidden_prefix: str) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in sorted(imports_of(path))
        if name == forbidden_prefix or name.startswith(forbidden_prefix + ".")
    ]


def test_uplink_ingest_and_store_import_nothing_from_ops() -> None:
    files = modules_under("uplink") + modules_under("ingest") + modules_under("store")
    assert offenders(files, "gateway.ops") == []


def test_ingest_and_uplink_meet_only_in_store() -> None:
    assert offenders(modules_under("ingest"), "gateway.uplink") == []
    assert offenders(modules_under("uplink"), "gateway.ingest") == []


def test_shared_root_modules_import_no_part() -> None:
    shared = [PACKAGE / f"{name}.py" for name in SHARED_ROOT_MODULES - {"app", "config"}]
    shared += modules_under("config")  # a package of its own: one module per section group
    for part in ("gateway.ingest", "gateway.store", "gateway.uplink", "gateway.ops", "gateway.cli"):
        assert offenders(shared, part) == []


def test_only_the_cli_imports_the_composition_root() -> None:
    everything = [p for p in modules_under() if p != PACKAGE / "__init__.py"]
    allowed = set(modules_under("cli"))
    found = offenders([p for p in everything if p not in allowed], "gateway.app")
    assert found == []


def test_the_package_root_keeps_only_what_every_part_shares() -> None:
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    root |= {"config"} if (PACKAGE / "config" / "__init__.py").exists() else set()
    assert root == SHARED_ROOT_MODULES
    assert len(root) <= 8

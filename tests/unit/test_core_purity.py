"""The routing core stays pure: no I/O libraries, no reaching into the rest of the router."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import router.core

CORE = Path(router.core.__file__).resolve().parent

FORBIDDEN_MODULES = {
    # The I/O edges of the router: they belong to handlers, upstream, index, telemetry.
    "aiohttp",
    "redis",
    "prometheus_client",
    "opentelemetry",
    "httpx",
    "asyncio",
    "uvloop",
    # Plain I/O and process control from the standard library.
    "socket",
    "ssl",
    "select",
    "selectors",
    "subprocess",
    "multiprocessing",
    "threading",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "urllib",
    "http",
    "logging",
    "sys",
    "time",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "compile", "__import__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """Absolute names of everything ``module`` imports (relative imports resolved)."""
    names: list[str] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.append(target)
    return names


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every purity rule ``source`` (the text of ``module``) breaks."""
    tree = ast.parse(source)
    found = []
    for name in _imports(tree, module, is_package):
        root = name.partition(".")[0]
        if root in FORBIDDEN_MODULES:
            found.append(f"{module} imports {name}")
        if root == "router" and not (name == "router.core" or name.startswith("router.core.")):
            found.append(f"{module} imports {name} from outside router.core")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_CALLS
        ):
            found.append(f"{module} calls {node.func.id}() on line {node.lineno}")
    return found


def test_core_modules_do_no_io() -> None:
    """Nothing under router/core imports an I/O library, calls open/print, or leaves the core."""
    modules = sorted(CORE.rglob("*.py"))
    names = {_module_name(path) for path in modules}
    assert {"router.core.model", "router.core.ring", "router.core.policies.cache_aware"} <= names
    problems = [
        problem
        for path in modules
        for problem in violations(
            path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"
        )
    ]
    assert problems == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import aiohttp", "imports aiohttp"),
        ("from opentelemetry.trace import get_tracer", "imports opentelemetry.trace"),
        ("import asyncio as aio", "imports asyncio"),
        ("from router.upstream import Upstream", "from outside router.core"),
        ("from ...handlers import handle", "router.handlers from outside router.core"),
        ("from .. import model", ""),
        ("open('x')", "calls open()"),
    ],
)
def test_purity_checker_catches_violations(source: str, expected: str) -> None:
    """The checker flags each kind of impurity (so a clean result above means something)."""
    found = violations(source, "router.core.policies.sample")
    if expected:
        assert any(expected in problem for problem in found), found
    else:
        assert found == []

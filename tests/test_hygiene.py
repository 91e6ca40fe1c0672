"""The suite waits on events, never on time: no test sleeps to synchronise.

A sleep that "gives the other side time" passes on an idle machine and fails on a loaded
one. Tests wait with `tests.waiting.wait_until` (the one poll loop allowed to sleep), and
only tests marked `slow` may sleep on purpose (an idle socket kept open for minutes).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ALLOWED = {("waiting.py", "wait_until")}
SLEEPS = {("time", "sleep"), ("asyncio", "sleep")}


def _is_slow_mark(node: ast.expr) -> bool:
    """`pytest.mark.slow` or `mark.slow`, called or not."""
    if isinstance(node, ast.Call):
        node = node.func
    return isinstance(node, ast.Attribute) and node.attr == "slow"


def _module_is_slow(tree: ast.Module) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in stmt.targets
        ):
            marks = stmt.value.elts if isinstance(stmt.value, ast.List | ast.Tuple) else [stmt.value]
            return any(_is_slow_mark(m) for m in marks)
    return False


def sleeps_in(source: str, filename: str) -> list[str]:
    """Where `source` sleeps outside `wait_until` and `slow` tests, as `file:line in function`."""
    tree = ast.parse(source, filename)
    if _module_is_slow(tree):
        return []
    found: list[str] = []

    def visit(node: ast.AST, function: str, exempt: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
            exempt = (
                exempt
                or (filename, node.name) in ALLOWED
                or any(_is_slow_mark(d) for d in node.decorator_list)
            )
        if (
            isinstance(node, ast.ImportFrom)
            and node.module in ("time", "asyncio")
            and any(alias.name == "sleep" for alias in node.names)
        ):
            found.append(f"{filename}:{node.lineno} imports {node.module}.sleep")
        if isinstance(node, ast.Call) and not exempt:
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in SLEEPS
            ):
                found.append(f"{filename}:{node.lineno} in {function}")
        for child in ast.iter_child_nodes(node):
            visit(child, function, exempt)

    visit(tree, "<module>", False)
    return found


def test_no_test_sleeps_to_synchronise() -> None:
    found = [
        hit
        for path in sorted(TESTS.rglob("*.py"))
        for hit in sleeps_in(path.read_text(), str(path.relative_to(TESTS)))
    ]

    assert found == [], (
        "wait on the event with tests.waiting.wait_until (or mark the test slow) "
        f"instead of sleeping: {found}"
    )


def test_the_guard_sees_sleeps_in_every_form() -> None:
    source = """
import time, asyncio, pytest
from time import sleep

def test_waits():
    time.sleep(0.5)

async def test_async():
    await asyncio.sleep(1)

@pytest.mark.slow
def test_idle_for_minutes():
    time.sleep(125)

def wait_until():
    time.sleep(0.1)
"""

    assert sleeps_in(source, "test_x.py") == [
        "test_x.py:3 imports time.sleep",
        "test_x.py:6 in test_waits",
        "test_x.py:9 in test_async",
        "test_x.py:16 in wait_until",
    ]  # only waiting.py's wait_until may sleep
    assert sleeps_in("import pytest, time\npytestmark = [pytest.mark.slow]\ntime.sleep(9)\n", "t.py") == []

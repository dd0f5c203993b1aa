"""``within``: a bounded await whose caller's cancel always wins (plain asyncio, no Ray).

The race it closes: the awaited result arrives in the same turn of the event
loop as the cancel of the task that waits for it. On Python 3.11
``asyncio.wait_for`` then returns the result and the cancel is lost; in the
router that let a disconnected client's stream decode to its end."""

from __future__ import annotations

import ast
import asyncio
import sys
from pathlib import Path

import pytest

from worker_common.timeouts import within

REPO = Path(__file__).resolve().parents[2]


async def cancel_as_result_arrives(bounded_await) -> str:
    """Cancel a task waiting in ``bounded_await(future)`` in the loop turn its future gets a result."""
    future = asyncio.get_running_loop().create_future()
    waiter = asyncio.create_task(bounded_await(future))
    await asyncio.sleep(0)  # the waiter now waits on the future
    future.set_result("result")
    waiter.cancel()
    try:
        return await waiter
    except asyncio.CancelledError:
        return "cancelled"


def test_a_cancel_wins_over_a_result_that_arrives_with_it():
    assert asyncio.run(cancel_as_result_arrives(lambda f: within(f, 10.0))) == "cancelled"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for was rewritten on asyncio.timeout in 3.12")
def test_wait_for_loses_that_cancel_on_this_python():
    """Why ``within`` exists: the same race through ``asyncio.wait_for`` swallows the cancel."""
    assert asyncio.run(cancel_as_result_arrives(lambda f: asyncio.wait_for(f, 10.0))) == "result"


def test_within_bounds_the_wait_and_passes_results():
    async def go():
        assert await within(asyncio.sleep(0, result=7), 1.0) == 7
        assert await within(asyncio.sleep(0, result=8), None) == 8
        with pytest.raises(TimeoutError):
            await within(asyncio.sleep(5), 0.01)

    asyncio.run(go())


def test_no_project_module_uses_wait_for():
    """Every bounded await in the project goes through ``within`` or ``asyncio.timeout``."""
    users = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in {".venv", "tests"} or rel.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for" and \
                    isinstance(node.value, ast.Name) and node.value.id == "asyncio":
                users.append(f"{rel}:{node.lineno}")
    assert users == [], users

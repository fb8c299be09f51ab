"""Rate-limit waits are announced and reported as wall-clock time (issue 9.9)."""

from __future__ import annotations

import threading

import pytest

from monitor.cli.sync import _progress
from monitor.collect import budget
from monitor.collect.budget import Limit, LocalBudget
from monitor.collect.http import RequestStats
from monitor.collect.progress import on_budget_wait


def test_a_budget_wait_is_announced_with_endpoint_and_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = "defender:/api/machines/{id}/logonusers"
    monkeypatch.setitem(budget.ENDPOINT_LIMITS, endpoint, Limit(2, 1000))
    slept: list[float] = []
    b = LocalBudget()
    b.sleep = slept.append  # type: ignore[method-assign]  # the wait itself is not under test
    heard: list[tuple[str, float, str]] = []
    remove = on_budget_wait(lambda e, s, lim: heard.append((e, s, lim)))
    try:
        with _progress(terminal=False) as progress:  # a pipe: lines on stderr
            progress("logon users", 1, 3)
            assert b.acquire(endpoint, max_wait=120) == 0.0
            assert b.acquire(endpoint, max_wait=120) == 0.0
            # the third call waits ~60 s (recorded, not slept); the clock does not move, so the
            # next wait would exceed max_wait and the budget gives up
            with pytest.raises(budget.BudgetExhausted):
                b.acquire(endpoint, max_wait=100)
            assert len(slept) == 1
    finally:
        remove()
    assert heard and heard[0][0] == endpoint and heard[0][2] == "2/min"
    assert 50 < heard[0][1] <= 60
    err = capsys.readouterr().err
    assert "progress: logon users 1/3" in err
    assert f"waiting {heard[0][1]:.0f} s for /api/machines/{{id}}/logonusers: 2/min" in err


def test_wait_is_wall_clock_not_a_sum_over_threads() -> None:
    stats = RequestStats()
    barrier = threading.Barrier(4)

    def waited() -> None:
        barrier.wait()
        stats.add_budget_wait(30.0)  # four threads each waited the same 30 s

    threads = [threading.Thread(target=waited) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = stats.to_dict()
    assert doc["budget_wait_thread_seconds"] == 120.0
    assert 30.0 <= doc["budget_wait_seconds"] < 60.0

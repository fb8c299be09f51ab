"""The randomized fault campaign (bench/campaign.py) in its short form: a few seeded cases of
faults per resource, SIGKILLs during sync and Redis restarts; nothing lost, invented or repeated.
`make campaign` runs the long form."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import campaign


@pytest.mark.timeout(120)
def test_short_campaign_finds_no_phantom_deletion_loss_or_duplicate() -> None:
    report = campaign.run(seed=2, cases=10, max_seconds=25, machines=8)
    assert report.cases >= 3 and report.syncs >= report.cases
    # seed 2 draws kills, faults and Redis restarts within its first cases
    assert report.kills >= 1 and report.faults >= 1 and report.redis_restarts >= 1
    assert report.ok, report.problems
    assert report.phantom_deletions == 0 and report.lost_events == 0
    assert report.duplicated_events == 0 and report.duplicated_event_ids == 0
    assert report.duplicated_notification_ids == 0
    assert report.events_not_notified == 0 and report.events_notified_twice == 0

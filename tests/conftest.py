"""Shared fixtures: the machine's real Redis (or an embedded one), a key prefix per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from monitor.redis_conn import delete_prefix, ensure_redis

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def redis_url() -> str:
    url, _ = ensure_redis(REDIS_URL)
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are removed afterwards."""
    prefix = f"mdetest-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    yield prefix
    delete_prefix(redis.Redis.from_url(redis_url), prefix)


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)

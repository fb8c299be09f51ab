"""Snapshot: the latest graph per tenant in Redis, and the diff against it."""

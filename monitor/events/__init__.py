"""Events: CloudEvents envelopes and the Redis streams they live in."""

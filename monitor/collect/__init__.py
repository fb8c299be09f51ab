"""Collect: sign in, fetch Graph and Defender resources (one module per resource)."""

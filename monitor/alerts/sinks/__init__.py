"""Sinks: one module per destination behind one small interface."""

"""Alerts: rules match events, a pipeline of small stages delivers them to sinks."""

"""mde-monitor: an event-driven change monitor for Microsoft Defender for Endpoint."""

__version__ = "0.1.0"

"""mde-monitor: an event-driven change monitor for Microsoft Defender for Endpoint."""

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mde-monitor")
    except PackageNotFoundError:
        return __version__

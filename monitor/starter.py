"""The starter files shipped with the package: the rule pack, `sinks.yaml`, the example config.

In a wheel they live in `monitor/starter/` (copied from the repository's `alerts/` and `config/` at
build time, see setup.py); in a source checkout or editable install they are read from the
repository itself, so there is one copy of each file. `mde-monitor init` writes them out.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "starter"
CHECKOUT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = "monitor.example.yaml"


@dataclass(frozen=True)
class Starter:
    alerts: Path  # the rule pack and sinks.yaml
    example_config: Path


def starter() -> Starter:
    """Where the shipped files are (packaged copy first, then the source checkout)."""
    for root in (PACKAGED, CHECKOUT):
        alerts, config = root / "alerts", root / "config" / EXAMPLE_CONFIG
        if (alerts / "sinks.yaml").is_file() and config.is_file():
            return Starter(alerts, config)
    raise FileNotFoundError(f"the starter files are missing from {PACKAGED} (a broken install?)")


def pack_dir() -> Path:
    """The shipped rule pack (for `rules check` and `demo` without an alerts directory)."""
    return starter().alerts


def init(target: Path, force: bool = False) -> tuple[list[Path], list[Path]]:
    """Write `config/monitor.yaml` and `alerts/*.yaml` under `target`.

    Returns (written, skipped): existing files are kept unless `force`.
    """
    files = starter()
    plan = [(files.example_config, target / "config" / "monitor.yaml")]
    plan += [
        (p, target / "alerts" / p.name)
        for p in sorted(files.alerts.iterdir())
        if p.is_file() and p.suffix in (".yaml", ".yml", ".md")
    ]
    written: list[Path] = []
    skipped: list[Path] = []
    for src, dst in plan:
        if dst.exists() and not force:
            skipped.append(dst)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(dst)
    return written, skipped

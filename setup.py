"""Build hook: copy the rule pack and the example config into the wheel (`monitor/starter/`).

Everything else is in pyproject.toml. The repository keeps one copy of each file (`alerts/`,
`config/monitor.example.yaml`); monitor/starter.py reads them from there in a source checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithStarter(build_py):
    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "monitor" / "starter"
        (dest / "alerts").mkdir(parents=True, exist_ok=True)
        (dest / "config").mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "alerts").iterdir()):
            if src.is_file() and src.suffix in (".yaml", ".yml", ".md"):
                shutil.copyfile(src, dest / "alerts" / src.name)
        shutil.copyfile(
            ROOT / "config" / "monitor.example.yaml", dest / "config" / "monitor.example.yaml"
        )


setup(cmdclass={"build_py": BuildPyWithStarter})

"""The package stands alone: wheel contents, `init`, `rules check` and `--version` anywhere (9.5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    if build.returncode != 0 and "project.license" in build.stderr:
        pytest.skip("this venv's setuptools is older than pyproject.toml requires (make install)")
    assert build.returncode == 0, build.stderr
    (whl,) = out.glob("mde_monitor-*.whl")
    return whl


def test_wheel_ships_the_rule_pack_sinks_and_example_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (REPO / "alerts").glob("*.yaml")}
    assert "sinks.yaml" in shipped
    for name in shipped:
        assert f"monitor/starter/alerts/{name}" in names
    assert "monitor/starter/config/monitor.example.yaml" in names
    assert any(n.startswith("monitor/simulator/recorded/") for n in names)


def test_installed_package_works_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MDE_MONITOR_CONFIG", "REDIS_URL")}
    env["PYTHONPATH"] = str(site)

    # one interpreter runs every command (imports are the slow part), each through `main`
    script = (
        "import contextlib, io, json, sys\n"
        "from monitor.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    code = 0\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        sys.argv = ['mde-monitor', *args]\n"
        "        try:\n"
        "            main()\n"
        "        except SystemExit as exc:\n"
        "            code = int(exc.code or 0)\n"
        "    print(json.dumps([code, out.getvalue(), err.getvalue()]))\n"
    )
    runs = [
        ["--version"],
        ["rules", "check", "--json"],  # no config, no alerts/ here: the shipped pack
        ["init", "starter"],
        ["init", "starter"],  # existing files are kept
        ["--alerts-dir", str(work / "starter" / "alerts"), "rules", "check"],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(runs)],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = [Ran(*json.loads(line)) for line in proc.stdout.splitlines()]
    version, check, init, again, own = results
    assert version.returncode == 0 and version.stdout.startswith("mde-monitor 0."), version
    assert check.returncode == 0, check.stderr
    doc = json.loads(check.stdout)
    assert Path(doc["directory"]).is_relative_to(site) and doc["rules"] and doc["errors"] == []
    assert init.returncode == 0, init.stderr
    assert (work / "starter" / "config" / "monitor.yaml").read_text() == (
        REPO / "config" / "monitor.example.yaml"
    ).read_text()
    assert (work / "starter" / "alerts" / "sinks.yaml").is_file()
    assert "kept" in again.stdout and again.returncode == 0
    assert own.returncode == 0, own.stderr


def test_sdist_holds_what_the_tests_need(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (sdist,) = tmp_path.glob("mde_monitor-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "tests/conftest.py",
        "tests/test_ops_package.py",
        "alerts/sinks.yaml",
        "config/monitor.example.yaml",
        "setup.py",
        "Makefile",
        "monitor/simulator/recorded/README.md",
    ):
        assert needed in names, needed

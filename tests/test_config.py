"""Config loading: interpolation, clouds, scopes, and errors that name the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import Cloud, ConfigError, PollingInterval, load_settings

GOOD = """
redis_url: redis://127.0.0.1:6379/0
tenants:
  - name: contoso
    tenant_id: 00000000-0000-0000-0000-000000000000
    client_id: 11111111-1111-1111-1111-111111111111
    client_secret: ${CONTOSO_SECRET}
    polling_interval: FIFTEEN_MINUTES
    cloud: public
    region: eu
  - name: gov
    tenant_id: t2
    client_id: c2
    client_secret_file: {secret_file}
    cloud: dod
  - name: sim
    tenant_id: t3
    client_id: c3
    client_secret: x
    cloud: custom
    endpoints:
      authority: https://127.0.0.1:9001
      graph: https://127.0.0.1:9002
      defender: https://127.0.0.1:9003/
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "monitor.yaml"
    p.write_text(text)
    return p


def test_good_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    monkeypatch.setenv("CONTOSO_SECRET", "s3cr3t-value")
    monkeypatch.delenv("REDIS_URL", raising=False)
    s = load_settings(write(tmp_path, GOOD.replace("{secret_file}", str(secret_file))))
    contoso, gov, sim = s.tenants
    assert contoso.secret() == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(contoso) and "s3cr3t-value" not in str(s.model_dump())
    assert contoso.polling_interval is PollingInterval.FIFTEEN_MINUTES
    assert contoso.polling_interval.seconds == 900
    ep = contoso.cloud_endpoints()
    assert ep.defender.base_url == "https://eu.api.security.microsoft.com"
    assert ep.graph.scope == "https://graph.microsoft.com/.default"
    assert gov.secret() == "from-file"
    assert gov.cloud is Cloud.DOD
    assert gov.cloud_endpoints().graph.base_url == "https://dod-graph.microsoft.us"
    assert gov.cloud_endpoints().authority == "https://login.microsoftonline.us"
    sep = sim.cloud_endpoints()
    assert sep.graph.scope == "https://127.0.0.1:9002/.default"
    assert sep.defender.scope == "https://127.0.0.1:9003/.default"
    assert sep.defender.base_url == "https://127.0.0.1:9003"


def test_missing_env_var_names_file_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONTOSO_SECRET", raising=False)
    p = write(tmp_path, GOOD.replace("{secret_file}", "/nonexistent"))
    with pytest.raises(ConfigError) as err:
        load_settings(p)
    assert str(p) in str(err.value)
    assert "tenants[0].client_secret" in str(err.value)
    assert "CONTOSO_SECRET" in str(err.value)


@pytest.mark.parametrize(
    ("snippet", "field", "expected"),
    [
        ("polling_interval: HOURLY", "tenants[0].polling_interval", "DISABLED"),
        ("cloud: mars", "tenants[0].cloud", "public"),
        ("unknown_key: 1", "tenants[0].unknown_key", "Extra inputs"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, snippet: str, field: str, expected: str) -> None:
    text = f"""
tenants:
  - name: a
    tenant_id: t
    client_id: c
    client_secret: x
    {snippet}
"""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(p)
    msg = str(err.value)
    assert str(p) in msg and field in msg and expected in msg


def test_credentials_exactly_one(tmp_path: Path) -> None:
    p = write(tmp_path, "tenants:\n  - {name: a, tenant_id: t, client_id: c}\n")
    with pytest.raises(ConfigError, match=r"tenants\[0\]: give exactly one of"):
        load_settings(p)


def test_custom_cloud_needs_endpoints(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "tenants:\n  - {name: a, tenant_id: t, client_id: c, client_secret: x, cloud: custom}\n",
    )
    with pytest.raises(ConfigError, match="endpoints"):
        load_settings(p)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    p = write(tmp_path, "tenants: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(p)


def test_unknown_tenant_lists_known(tmp_path: Path) -> None:
    p = write(tmp_path, "tenants:\n  - {name: a, tenant_id: t, client_id: c, client_secret: x}\n")
    with pytest.raises(ConfigError, match="known: a"):
        load_settings(p).tenant("b")

"""Certificate thumbprints: the forms people paste are normalised; anything but a SHA-1
thumbprint is a config error naming the file and the field (a SHA-256 one says so)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from monitor.collect.collector import collect_tenant
from monitor.config import ConfigError, load_settings, parse_settings
from monitor.simulator import Simulator, generate_tenant

SHA1 = hashlib.sha1(b"certificate").hexdigest().upper()  # 40 hex digits
SHA256 = hashlib.sha256(b"certificate").hexdigest().upper()  # 64 hex digits


def config(tmp_path: Path, thumbprint: str) -> Path:
    pem = tmp_path / "cert.pem"
    pem.write_text("not read at load time")
    p = tmp_path / "monitor.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "tenants": [
                    {
                        "name": "contoso",
                        "tenant_id": "t",
                        "client_id": "c",
                        "certificate": {"pem_path": str(pem), "thumbprint": thumbprint},
                    }
                ]
            },
            allow_unicode=True,
        )
    )
    return p


def pairs(text: str, sep: str) -> str:
    return sep.join(text[i : i + 2] for i in range(0, len(text), 2))


@pytest.mark.parametrize(
    "given",
    [
        SHA1,
        SHA1.lower(),
        pairs(SHA1, ":"),
        pairs(SHA1.lower(), ":"),
        pairs(SHA1, " "),
        pairs(SHA1, "-"),
        f"  {pairs(SHA1, ' ')}  ",
        "\u200e" + pairs(SHA1.lower(), " "),  # as copied from Windows' certificate dialog
    ],
)
def test_pasted_forms_are_normalised(tmp_path: Path, given: str) -> None:
    settings = load_settings(config(tmp_path, given))
    cert = settings.tenants[0].certificate
    assert cert is not None and cert.thumbprint == SHA1


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (SHA256, "SHA-256 thumbprint"),
        (pairs(SHA256.lower(), ":"), "SHA-256 thumbprint"),
        (SHA1[:-2], "40 hex digits, got 38"),
        (SHA1[:-1] + "G", "hex digits (0-9, A-F), found 'G'"),
        (" : ", "empty"),
    ],
)
def test_bad_thumbprint_names_file_and_field(tmp_path: Path, given: str, expected: str) -> None:
    path = config(tmp_path, given)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert str(path) in message
    assert "tenants[0].certificate.thumbprint" in message
    assert expected in message


def test_sign_in_with_a_colon_separated_thumbprint(tmp_path: Path) -> None:
    """The normalised thumbprint signs in against the simulator's Entra ID (real HTTPS)."""
    tenant = generate_tenant(machines=2, users=2, vulns_per_machine=1, cves=2, seed=3)
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        pem_path, thumbprint = sim.tenant(tenant.tenant_id).add_certificate()
        data = yaml.safe_load(sim.config_yaml())
        t = data["tenants"][0]
        t.pop("client_secret", None)
        t["certificate"] = {"pem_path": str(pem_path), "thumbprint": pairs(thumbprint.lower(), ":")}
        settings = parse_settings(data, "test")
        result = collect_tenant(settings, settings.tenants[0])
        assert result.auth_error is None and result.graph is not None

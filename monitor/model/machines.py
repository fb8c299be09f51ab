"""Machines: Defender `/api/machines` objects -> a HostAgent and a Device entity each.

As JupiterOne does, every Defender machine gives a `microsoft_defender_machine` (the agent,
class HostAgent) and a `user_endpoint` (the device, class Device), with account HAS machine and
machine MANAGES user_endpoint.

Address rules (documented in docs/data-model.md, tested in tests/test_model.py):

- `ipAddress`: every distinct non-empty `ipAddresses[].ipAddress` of any interface except loopback
  addresses (127.0.0.0/8 and ::1), sorted.
- `macAddress`: the MAC of every interface except those in an explicit non-up
  `operationalStatus` (`Down`, `Testing`, `Dormant`, `NotPresent`, `LowerLayerDown`), of `type`
  `SoftwareLoopback` or on a loopback IP. `Up`, `Unknown`, a missing/null status and a null `type`
  are kept: real tenants report live interfaces that way (JupiterOne's recordings have them).
  The MAC must be 12 hex digits (bare or in `:`/`-` separated pairs, any case) and not all zeros.
  Written `AA:BB:CC:DD:EE:FF` upper-case, distinct, sorted. Sorting both lists keeps a reordering
  by Defender from looking like a change.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from monitor.model.raw import RawData
from monitor.model.schema import (
    ACCOUNT_HAS_MACHINE,
    DEVICE,
    MACHINE,
    MACHINE_MANAGES_DEVICE,
    ModelError,
    epoch_ms,
    require_str,
)

Item = dict[str, Any]

MACHINE_FUNCTIONS = (
    "endpoint-compliance",
    "endpoint-configuration",
    "endpoint-protection",
    "anti-malware",
    "vulnerability-detection",
    "container-security",
)

# .NET OperationalStatus values that say the interface is not up (compared case-insensitively).
NON_UP_STATUSES = frozenset({"down", "testing", "dormant", "notpresent", "lowerlayerdown"})

_HEX12 = re.compile(r"[0-9A-F]{12}")
_NO_SEPARATORS = str.maketrans("", "", ":-")


def format_mac(value: object) -> str | None:
    """`AA:BB:CC:DD:EE:FF` for 12 hex digits (bare or `:`/`-` separated) not all zero; else None."""
    if not isinstance(value, str):
        return None
    digits = value.strip().upper()
    if len(digits) == 17:
        if digits[2::3] not in (":::::", "-----"):
            return None
        digits = digits.translate(_NO_SEPARATORS)
    if not _HEX12.fullmatch(digits) or digits == "000000000000":
        return None
    return ":".join((digits[0:2], digits[2:4], digits[4:6], digits[6:8], digits[8:10], digits[10:]))


def is_loopback_ip(value: str) -> bool:
    """127.0.0.0/8 or ::1 (a zone suffix such as `%3` is ignored); False when not an IP."""
    if value in ("127.0.0.1", "::1"):
        return True
    if ":" in value:
        if not value.split("%", 1)[0].endswith("1"):
            return False  # an IPv6 loopback address always ends in 1
    elif not value.startswith("127."):
        return False  # an IPv4 address outside 127/8, or not an address
    return _is_loopback_parsed(value.split("%", 1)[0])


@functools.lru_cache(maxsize=4096)
def _is_loopback_parsed(value: str) -> bool:
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


def _interfaces(machine: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = machine.get("ipAddresses")
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(i, Mapping) for i in raw):
        raise ModelError("machine: field 'ipAddresses' must be a list of objects")
    return raw


def _not_up(status: object) -> bool:
    """True only for an explicit non-up status; Up, Unknown, null or absent are not."""
    return isinstance(status, str) and status.strip().lower() in NON_UP_STATUSES


def machine_addresses(machine: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(`ipAddress`, `macAddress`) of a machine by the rules in this module's docstring."""
    ips: set[str] = set()
    macs: set[str] = set()
    for i in _interfaces(machine):
        ip = i.get("ipAddress")
        loopback = False
        if isinstance(ip, str) and ip:
            loopback = is_loopback_ip(ip)
            if not loopback:
                ips.add(ip)
        if loopback or _not_up(i.get("operationalStatus")) or i.get("type") == "SoftwareLoopback":
            continue
        mac = format_mac(i.get("macAddress"))
        if mac is not None:
            macs.add(mac)
    return sorted(ips), sorted(macs)


def machine_ip_addresses(machine: Mapping[str, Any]) -> list[str]:
    """Distinct interface IPs without loopback, sorted."""
    return machine_addresses(machine)[0]


def machine_mac_addresses(machine: Mapping[str, Any]) -> list[str]:
    """MACs of interfaces not explicitly down, not SoftwareLoopback, not loopback, not all-zero."""
    return machine_addresses(machine)[1]


def machine_display_name(machine: Mapping[str, Any]) -> str:
    """computerDnsName, else "<managedBy or 'Unknown User'>'s Device" (JupiterOne's rule)."""
    dns = machine.get("computerDnsName")
    if isinstance(dns, str) and dns:
        return dns
    return f"{machine.get('managedBy') or 'Unknown User'}'s Device"


def machine_entity(machine: Mapping[str, Any], *, account_tag: str | None = None) -> Item:
    """The `microsoft_defender_machine` (HostAgent) entity of one Defender machine."""
    machine_id = require_str(machine, "machine")
    get = machine.get
    ips, macs = machine_addresses(machine)
    properties = {
        "id": machine_id,
        "computerDnsName": get("computerDnsName"),
        "firstSeenOn": epoch_ms(get("firstSeen")),
        "lastSeenOn": epoch_ms(get("lastSeen")),
        "agentVersion": get("agentVersion"),
        "defenderAvStatus": get("defenderAvStatus"),
        "riskScore": get("riskScore"),
        "exposureLevel": get("exposureLevel"),
        "healthStatus": get("healthStatus"),
        "onboardingStatus": get("onboardingStatus"),
        "deviceValue": get("deviceValue"),
        "rbacGroupId": get("rbacGroupId"),
        "rbacGroupName": get("rbacGroupName"),
        "machineTags": get("machineTags"),
        "managedBy": get("managedBy"),
        "managedByStatus": get("managedByStatus"),
        "osPlatform": get("osPlatform"),
        "osVersion": get("osVersion"),
        "osBuild": get("osBuild"),
        "osProcessor": get("osProcessor"),
        "osArchitecture": get("osArchitecture"),
        "version": get("version"),
        "lastIpAddress": get("lastIpAddress"),
        "lastExternalIpAddress": get("lastExternalIpAddress"),
        "ipAddress": ips,
        "macAddress": macs,
        "aadDeviceId": get("aadDeviceId"),
        "isAadJoined": get("isAadJoined"),
        "isExcluded": get("isExcluded"),
        "exclusionReason": get("exclusionReason"),
        "isPotentialDuplication": get("isPotentialDuplication"),
        "mergedIntoMachineId": get("mergedIntoMachineId"),
        "function": list(MACHINE_FUNCTIONS),
    }
    name = machine_display_name(machine)
    return MACHINE.entity(machine_id, name, properties, raw=machine, account_tag=account_tag)


def device_entity(
    machine: Mapping[str, Any], *, account_tag: str | None = None, raw: RawData | None = None
) -> Item:
    """The `user_endpoint` (Device) entity of one Defender machine (JupiterOne's endpoint).
    `raw`: the machine's `_rawData` when its HostAgent entity is built too (held once)."""
    machine_id = require_str(machine, "machine")
    get = machine.get
    vm = get("vmMetadata")
    if vm is not None and not isinstance(vm, Mapping):
        raise ModelError("machine: field 'vmMetadata' must be an object")
    vm = vm or {}
    dns = get("computerDnsName")
    ips, macs = machine_addresses(machine)
    properties = {
        "id": machine_id,
        "deviceId": machine_id,
        "category": "endpoint",
        "computerDnsName": dns,
        "hostname": dns,
        "fqdn": dns,
        "firstSeenOn": epoch_ms(get("firstSeen")),
        "lastSeenOn": epoch_ms(get("lastSeen")),
        "osPlatform": get("osPlatform"),
        "osVersion": get("osVersion") or None,
        "osProcessor": get("osProcessor") or None,
        "osArchitecture": get("osArchitecture"),
        "osBuild": get("osBuild"),
        "version": get("version"),
        "lastIpAddress": get("lastIpAddress"),
        "lastExternalIpAddress": get("lastExternalIpAddress"),
        "agentVersion": get("agentVersion"),
        "healthStatus": get("healthStatus"),
        "deviceValue": get("deviceValue"),
        "rbacGroupId": get("rbacGroupId"),
        "rbacGroupName": get("rbacGroupName"),
        "riskScore": get("riskScore"),
        "exposureLevel": get("exposureLevel"),
        "isAadJoined": get("isAadJoined"),
        "aadDeviceId": get("aadDeviceId"),
        "machineTags": get("machineTags"),
        "defenderAvStatus": get("defenderAvStatus"),
        "onboardingStatus": get("onboardingStatus"),
        "managedBy": get("managedBy"),
        "managedByStatus": get("managedByStatus"),
        "vmId": vm.get("vmId"),
        "cloudProvider": vm.get("cloudProvider"),
        "resourceId": vm.get("resourceId"),
        "subscriptionId": vm.get("subscriptionId"),
        "ipAddresses": [i.get("ipAddress") for i in _interfaces(machine)],
        "ipAddress": ips,
        "macAddress": macs,
        "make": None,
        "model": None,
        "serial": None,
    }
    name = machine_display_name(machine)
    return DEVICE.entity(
        machine_id,
        name,
        properties,
        raw=raw if raw is not None else machine,
        account_tag=account_tag,
    )


def account_machine_relationship(account_key: str, machine_key: str) -> Item:
    """account HAS machine."""
    return ACCOUNT_HAS_MACHINE.relationship(account_key, machine_key)


def machine_device_relationship(machine_key: str, device_key: str) -> Item:
    """machine MANAGES user_endpoint."""
    return MACHINE_MANAGES_DEVICE.relationship(machine_key, device_key)

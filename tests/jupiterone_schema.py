"""JupiterOne's schema checks, in Python, over the vendored `@jupiterone/data-model` schemas.

A port of `toMatchGraphObjectSchema` and `toMatchDirectRelationshipSchema` from
`@jupiterone/integration-sdk-testing` (9.x, `src/jest.ts`): the class schemas and the ones they
`$ref` in `allOf` are collected, flattened and deep-merged (arrays concatenated, later schemas
winning, then `type` / `required` / `enum` deduplicated, `_class` pinned with `const`), and the
item is validated with draft-07 JSON Schema. Formats follow ajv-formats' "full" mode for the
ones these classes use (`email`, `uri`, `hostname`, `ip`, `ipv4`, `ipv6`); like ajv, a format
only ever checks strings.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator, FormatChecker

SCHEMAS = Path(__file__).resolve().parent / "data" / "jupiterone"
PINNED = "0.54.0"  # the release the suite must pass (see tests/data/jupiterone/README.md)
NEWEST = "0.64.2"  # reported on, never failed

Schema = dict[str, Any]

# ajv-formats "full" regexes (MIT), for the formats the classes above use.
_EMAIL = re.compile(
    r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$",
    re.IGNORECASE,
)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
    r"(?:\.[a-z0-9](?:[-0-9a-z]{0,61}[0-9a-z])?)*\.?$",
    re.IGNORECASE,
)
_URI = re.compile(r"^[a-z][a-z0-9+.-]*:[^\s]*$", re.IGNORECASE)  # scheme + no whitespace


def _ip(version: int | None) -> Any:
    def check(value: object) -> bool:
        if not isinstance(value, str):
            return True
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            return False
        return version is None or addr.version == version

    return check


def format_checker() -> FormatChecker:
    checker = FormatChecker(formats=())
    checker.checks("email")(lambda v: not isinstance(v, str) or bool(_EMAIL.match(v)))
    checker.checks("hostname")(lambda v: not isinstance(v, str) or bool(_HOSTNAME.match(v)))
    checker.checks("uri")(lambda v: not isinstance(v, str) or bool(_URI.match(v)))
    checker.checks("ip")(_ip(None))
    checker.checks("ipv4")(_ip(4))
    checker.checks("ipv6")(_ip(6))
    return checker


def _deepmerge(target: Any, source: Any) -> Any:
    """npm `deepmerge` (v4) with its defaults: arrays concatenate, objects merge, else source."""
    if isinstance(source, list) != isinstance(target, list):
        return copy.deepcopy(source)
    if isinstance(source, list):
        return [*copy.deepcopy(target), *copy.deepcopy(source)]
    if not isinstance(source, dict):
        return copy.deepcopy(source)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in source.items():
        if isinstance(target, dict) and key in target and isinstance(value, dict | list):
            out[key] = _deepmerge(target[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_all(schemas: Iterable[Any]) -> Any:
    merged: Any = {}
    for s in schemas:
        merged = _deepmerge(merged, s)
    return merged


class DataModel:
    """The vendored schemas of one `@jupiterone/data-model` release, by `$id` (`#Device`)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.by_id: dict[str, Schema] = {}
        for path in sorted((SCHEMAS / f"data-model-{version}").glob("*.json")):
            schema = json.loads(path.read_text())
            self.by_id[schema["$id"]] = schema
        self._checker = format_checker()

    def _collect(self, ref: str) -> list[Schema]:
        """The schema of `ref` and, depth first, those it `$ref`s in `allOf`."""
        if ref not in self.by_id:
            raise KeyError(f"data-model {self.version}: no schema {ref!r}")
        schema = self.by_id[ref]
        out = [schema]
        for part in schema.get("allOf", []):
            if "$ref" in part:
                out += self._collect(part["$ref"])
        return out

    @staticmethod
    def _flatten(schemas: list[Schema]) -> Schema:
        """`generateGraphObjectSchemaFromDataModelSchemas`: one merged schema."""
        flat: list[Schema] = []
        for schema in schemas:
            schema = {k: v for k, v in schema.items() if k not in ("$schema", "$id", "description")}
            if "allOf" not in schema:
                flat.append(schema)
                continue
            own = _merge_all(p for p in schema["allOf"] if "$ref" not in p)
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            flat.append(_merge_all([rest, own]))
        result: Schema = _merge_all(flat)
        props = result.get("properties") or {}
        for name, prop in list(props.items()):
            prop = dict(prop)
            if isinstance(prop.get("type"), list):
                prop["type"] = list(dict.fromkeys(prop["type"]))
            if isinstance(prop.get("enum"), list):
                prop["enum"] = list(dict.fromkeys(map(json.dumps, prop["enum"])))
                prop["enum"] = [json.loads(e) for e in prop["enum"]]
            props[name] = prop
        if "required" in result:
            result["required"] = list(dict.fromkeys(result["required"]))
        return result

    def entity_schema(self, classes: list[str] | str, type_: str | None = None) -> Schema:
        """`toMatchGraphObjectSchema({_class, _type})`'s schema."""
        wanted = classes if isinstance(classes, list) else [classes]
        collected: list[Schema] = []
        for c in wanted:
            collected += self._collect(f"#{c}")
        schema = self._flatten([*reversed(collected), {}])
        schema.setdefault("properties", {})["_class"] = {"const": classes}
        if type_:
            schema["properties"]["_type"] = {"const": type_}
        return schema

    def direct_relationship_schema(self) -> Schema:
        """`toMatchDirectRelationshipSchema()`'s schema: GraphObject + scalar properties only."""
        direct: Schema = {
            "type": "object",
            "allOf": [
                {"$ref": "#GraphObject"},
                {
                    "additionalProperties": {
                        "anyOf": [
                            {"type": "boolean"},
                            {"type": "integer"},
                            {"type": "null"},
                            {"type": "number"},
                            {"type": "string"},
                        ]
                    }
                },
            ],
        }
        return self._flatten([*reversed(self._collect("#GraphObject")), direct, {}])

    def errors(self, schema: Schema, item: Mapping[str, Any]) -> list[str]:
        """What `schema` rejects in `item`: `path: message` per error."""
        validator = Draft7Validator(schema, format_checker=self._checker)
        out = []
        for err in validator.iter_errors(dict(item)):
            path = "/" + "/".join(str(p) for p in err.absolute_path)
            if err.validator == "required":
                out.append(f"{path}: {err.message}")
            else:  # the rule, not the value (values are tenant data)
                rule = json.dumps(err.validator_value, separators=(",", ":"))
                out.append(f"{path}: must match {err.validator} {rule[:200]}")
        return out


@dataclass
class Rejection:
    kind: str  # entity | relationship | mapped target
    type: str
    key: str
    errors: list[str]


def validate_export(
    model: DataModel, export: Mapping[str, list[dict[str, Any]]]
) -> list[Rejection]:
    """Every entity against its declared classes, every direct relationship against the
    direct-relationship rules, every mapped target against the classes it declares (none: only
    the GraphObject basics); plus the SDK's distinct-`_key` check per `_type`."""
    rejected: list[Rejection] = []
    schemas: dict[str, Schema] = {}
    keys: Counter[tuple[str, str]] = Counter()
    for entity in export["entities"]:
        keys[(entity["_type"], entity["_key"])] += 1
        sig = json.dumps([entity["_class"], entity["_type"]])
        if sig not in schemas:
            schemas[sig] = model.entity_schema(entity["_class"], entity["_type"])
        errs = model.errors(schemas[sig], entity)
        if errs:
            rejected.append(Rejection("entity", entity["_type"], entity["_key"], errs))
    direct = model.direct_relationship_schema()
    for rel in export["relationships"]:
        keys[(rel["_type"], rel["_key"])] += 1
        errs = model.errors(direct, rel)
        if errs:
            rejected.append(Rejection("relationship", rel["_type"], rel["_key"], errs))
    basics = copy.deepcopy(model._flatten(model._collect("#GraphObject")))
    basics["required"] = ["_key", "_type"]
    for rel in export["mappedRelationships"]:
        target = rel["_mapping"]["targetEntity"]
        schema = model.entity_schema(target["_class"], None) if "_class" in target else basics
        errs = model.errors(schema, target)
        if errs:
            rejected.append(Rejection("mapped target", target["_type"], target["_key"], errs))
    for (typ, key), n in keys.items():
        if n > 1:
            rejected.append(Rejection("duplicate _key", typ, key, [f"{n} items share it"]))
    return rejected


def summarize(rejected: list[Rejection]) -> dict[str, dict[str, int]]:
    """`_type` -> reason (`path: message`) -> how many items it rejects."""
    out: dict[str, Counter[str]] = {}
    for r in rejected:
        reasons = out.setdefault(f"{r.kind} {r.type}", Counter())
        for e in dict.fromkeys(re.sub(r"/\d+(?=/|:)", "/N", e) for e in r.errors):
            reasons[e] += 1
    return {t: dict(sorted(c.items())) for t, c in sorted(out.items())}

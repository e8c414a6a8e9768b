"""The cases of ``structured.py``: five JSON schemas of growing complexity, a hand-written valid
document for each, and seeded invalid mutations of those documents for the cross-check (see
``structured.py``'s docstring for how they are used).
"""

from __future__ import annotations

import copy
import json
import random

SEPARATORS = (", ", ": ")  # the server's FIXED item / key separators

# ---------------------------------------------------------------------------------------------
# schemas and their valid documents

_NAME = {"type": "string", "maxLength": 64}
_INT = {"type": "integer"}


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    """A closed object: ``required`` defaults to every property."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": list(properties) if required is None else required}  # fmt: skip


def _enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


def _range(lo, hi, kind: str = "integer") -> dict:
    return {"type": kind, "minimum": lo, "maximum": hi}


_TOOL_PROPS = {
    "name": {"type": "string", "maxLength": 63},
    "namespace": {"type": "string", "maxLength": 63},
    "image": {"type": "string"},
    "tag": {"type": "string"},
    "replicas": _range(0, 100),
    "strategy": _enum("rolling", "recreate", "blue_green", "canary"),
    "max_surge": _range(0, 10),
    "max_unavailable": _range(0, 10),
    "cpu_millicores": _range(50, 64000),
    "memory_mb": _range(64, 262144),
    "gpu_count": _range(0, 8),
    "gpu_type": _enum("none", "a10", "l4", "a100", "h100", "h200"),
    "ports": {"type": "array", "maxItems": 8, "items": _obj(
        {"name": _NAME, "port": _range(1, 65535), "protocol": _enum("tcp", "udp")})},
    "env": {"type": "array", "maxItems": 32, "items": _obj(
        {"name": _NAME, "value": {"type": "string"}})},
    "secrets": {"type": "array", "items": {"type": "string"}},
    "command": {"type": "array", "items": {"type": "string"}},
    "args": {"type": "array", "items": {"type": "string"}},
    "working_dir": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    "health_check": _obj({"path": {"type": "string"}, "interval_s": _range(1, 300),
                          "timeout_s": _range(1, 60), "healthy_threshold": _range(1, 10)},
                         ["path"]),
    "readiness_path": {"type": "string"},
    "liveness_path": {"type": "string"},
    "restart_policy": _enum("always", "on_failure", "never"),
    "termination_grace_s": _range(0, 3600),
    "node_selector": {"type": "object", "additionalProperties": {"type": "string"}},
    "tolerations": {"type": "array", "items": _obj(
        {"key": {"type": "string"}, "operator": _enum("equal", "exists"),
         "effect": _enum("no_schedule", "no_execute")})},
    "priority_class": _enum("low", "normal", "high", "critical"),
    "autoscale": _obj({"enabled": {"type": "boolean"}, "min_replicas": _range(0, 100),
                       "max_replicas": _range(1, 100), "target_cpu_percent": _range(1, 100)},
                      ["enabled"]),
    "volumes": {"type": "array", "items": _obj(
        {"name": _NAME, "mount_path": {"type": "string"}, "size_gb": _range(1, 1024),
         "read_only": {"type": "boolean"}})},
    "service_account": {"type": "string"},
    "region": _enum("us-east-1", "us-west-2", "eu-west-1", "ap-south-1"),
    "zones": {"type": "array", "maxItems": 3, "items": {"type": "string"}},
    "public": {"type": "boolean"},
    "domain": {"type": ["string", "null"]},
    "tls": {"type": "boolean"},
    "timeout_s": _range(0, 600, "number"),
    "log_level": _enum("debug", "info", "warning", "error"),
    "dry_run": {"type": "boolean"},
    "notes": {"type": "string", "maxLength": 500},
}  # fmt: skip
_TOOL_REQUIRED = ["name", "image", "replicas", "strategy", "cpu_millicores", "memory_mb", "ports",
                  "env", "region", "public", "dry_run"]  # fmt: skip

_FLAT = _obj({"name": {"type": "string"}, "age": _INT, "role": _enum("admin", "user", "guest"),
              "active": {"type": "boolean"}}, ["name", "age", "role"])  # fmt: skip
_NESTED = _obj({
    "order_id": {"type": "string", "maxLength": 16},
    "customer": _obj({"name": {"type": "string", "maxLength": 40}, "email": {"type": "string"}}),
    "items": {"type": "array", "minItems": 1, "maxItems": 10, "items": _obj(
        {"sku": {"type": "string", "maxLength": 12}, "qty": _range(1, 100),
         "price": {"type": "number", "minimum": 0}})},
    "shipping": _obj({"address": _obj({"street": {"type": "string"}, "city": {"type": "string"},
                                       "zip": {"type": "string", "maxLength": 10}}),
                      "express": {"type": "boolean"}}),
    "notes": {"type": "string", "maxLength": 200},
}, ["order_id", "customer", "items", "shipping"])  # fmt: skip
_UNION = {**_obj({
    "title": {"type": "string"},
    "owner": {"anyOf": [{"$ref": "#/$defs/user"}, {"type": "null"}]},
    "shapes": {"type": "array", "items": {"$ref": "#/$defs/shape"}},
    "style": {"anyOf": [{"$ref": "#/$defs/color"}, _enum("none", "inherit")]},
}), "$defs": {
    "user": _obj({"id": _INT, "name": {"type": "string"}}),
    "shape": {"oneOf": [{"$ref": "#/$defs/circle"}, {"$ref": "#/$defs/rect"},
                        {"$ref": "#/$defs/polygon"}]},
    "circle": _obj({"kind": {"const": "circle"}, "radius": {"type": "number"}}),
    "rect": _obj({"kind": {"const": "rect"}, "w": {"type": "number"}, "h": {"type": "number"}}),
    "polygon": _obj({"kind": {"const": "polygon"}, "points": {"type": "array", "items": {
        "type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}}}),
    "color": _obj({"r": _range(0, 255), "g": _range(0, 255), "b": _range(0, 255)}),
}}  # fmt: skip

SCHEMAS: dict[str, dict] = {
    "json_object": {"type": "object"},
    "flat": _FLAT,
    "nested": _NESTED,
    "union": _UNION,
    "tool": _obj(_TOOL_PROPS, _TOOL_REQUIRED),
}

DOCS: dict[str, object] = {
    "json_object": {"name": "Ada", "tags": ["math", "engines"], "born": 1815, "ratio": 0.5,
                    "alive": False, "spouse": None, "notes": {"first": "Analytical Engine"}},
    "flat": {"name": "Ada Lovelace", "age": 36, "role": "admin", "active": True},
    "nested": {
        "order_id": "A-1029", "customer": {"name": "Grace Hopper", "email": "grace@example.com"},
        "items": [{"sku": "KB-101", "qty": 2, "price": 49.5},
                  {"sku": "MS-7", "qty": 1, "price": 19.99}],
        "shipping": {"address": {"street": "1 Navy Way", "city": "Arlington", "zip": "22201"},
                     "express": True},
        "notes": "Leave at the front desk.",
    },
    "union": {
        "title": "floor plan", "owner": {"id": 7, "name": "Edsger"},
        "shapes": [{"kind": "circle", "radius": 2.5}, {"kind": "rect", "w": 3, "h": 4},
                   {"kind": "polygon", "points": [[0, 0], [1, 0], [0.5, 1]]}],
        "style": {"r": 10, "g": 200, "b": 30},
    },
    "tool": {
        "name": "api-gateway", "namespace": "prod", "image": "registry.example.com/gateway",
        "tag": "v2.14.1", "replicas": 6, "strategy": "canary", "max_surge": 2,
        "cpu_millicores": 1500, "memory_mb": 4096, "gpu_count": 0, "gpu_type": "none",
        "ports": [{"name": "http", "port": 8080, "protocol": "tcp"},
                  {"name": "metrics", "port": 9090, "protocol": "tcp"}],
        "env": [{"name": "LOG_FORMAT", "value": "json"}, {"name": "REGION", "value": "eu"}],
        "command": ["/bin/gateway"], "args": ["--config", "/etc/gateway.yaml"],
        "labels": {"team": "platform", "tier": "edge"},
        "health_check": {"path": "/healthz", "interval_s": 10, "timeout_s": 2},
        "restart_policy": "always", "termination_grace_s": 30, "priority_class": "high",
        "autoscale": {"enabled": True, "min_replicas": 3, "max_replicas": 20,
                      "target_cpu_percent": 70},
        "region": "eu-west-1", "zones": ["eu-west-1a", "eu-west-1b"], "public": True,
        "domain": "api.example.com", "tls": True, "timeout_s": 30.5, "log_level": "info",
        "dry_run": False,
    },
}  # fmt: skip


WARMUP_SCHEMA = {"type": "array", "items": {"type": "integer"}}  # not one of SCHEMAS
WARMUP_DOC = "[1, 2]"


def dumps(value) -> str:
    """A document as the server's grammar spells it: ``", "`` / ``": "``, no other space."""
    return json.dumps(value, separators=SEPARATORS)


def _validator(schema: dict):
    import jsonschema

    return jsonschema.validators.validator_for(schema)(schema)


def check_docs() -> None:
    """Every fixed document is valid for its schema (else the benchmark measures nothing)."""
    for name, schema in SCHEMAS.items():
        errors = list(_validator(schema).iter_errors(DOCS[name]))
        if errors:
            raise SystemExit(f"DOCS[{name!r}] is not valid: {errors[0].message}")


# ---------------------------------------------------------------------------------------------
# invalid documents for the cross-check

MUTATIONS = ("type", "enum", "long", "range", "extra", "drop", "items", "truncate", "comma")
_OTHER_TYPES = (123, "text", True, None, [1], {"k": 1})


def _nodes(value, path=()):
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, (*path, i))


def _with(doc, path, value):
    if not path:
        return value
    out = copy.deepcopy(doc)
    node = out
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return out


def _where(path) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _closers(text: str) -> list[int]:
    """Offsets of the ``}`` and ``]`` of a JSON text that are not inside a string."""
    out, in_str, escaped = [], False, False
    for i, c in enumerate(text):
        if in_str:
            in_str, escaped = (c != '"' or escaped), (c == "\\" and not escaped)
        elif c == '"':
            in_str = True
        elif c in "}]":
            out.append(i)
    return out


def _mutate(rng: random.Random, doc):
    """One random mutation of ``doc``: ``(kind, where, text)``, or None if it does not apply."""
    kind = rng.choice(MUTATIONS)
    if kind == "truncate":
        return kind, "end", dumps(doc)[:-1]
    if kind == "comma":  # a trailing comma before a closing bracket: not JSON
        text = dumps(doc)
        at = rng.choice(_closers(text))
        return kind, f"char {at}", text[:at] + ", " + text[at:]
    nodes = list(_nodes(doc))
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    pick = {
        "type": lambda v: True,
        "enum": lambda v: isinstance(v, str),
        "long": lambda v: isinstance(v, str),
        "range": is_num,
        "extra": lambda v: isinstance(v, dict),
        "drop": lambda v: isinstance(v, dict) and v,
        "items": lambda v: isinstance(v, list),
    }[kind]
    nodes = [(p, v) for p, v in nodes if pick(v)]
    if not nodes:
        return None
    path, v = rng.choice(nodes)
    if kind == "type":
        new = rng.choice([o for o in _OTHER_TYPES if type(o) is not type(v)])
    elif kind == "enum":
        new = "not_a_choice"
    elif kind == "long":
        new = "x" * 600
    elif kind == "range":
        new = rng.choice((10**7, -(10**7)))
    elif kind == "extra":
        new = {**v, "unexpected": 1}
    elif kind == "drop":
        new = dict(v)
        del new[rng.choice(list(v))]
    else:
        new = [] if rng.random() < 0.5 else [v[0] if v else 1] * 40
    return kind, _where(path), dumps(_with(doc, path, new))


def invalid_docs(name: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct documents that ``jsonschema`` rejects for ``SCHEMAS[name]`` (fewer when
    500 draws do not find them), the same in every process for the same seed."""
    rng = random.Random(f"{seed}:{name}")
    validator, doc = _validator(SCHEMAS[name]), DOCS[name]
    out: dict[str, dict] = {}
    for _ in range(500):
        if len(out) >= n:
            break
        m = _mutate(rng, doc)
        if m is None or m[2] in out:
            continue
        kind, where, text = m
        if kind not in ("truncate", "comma") and validator.is_valid(json.loads(text)):
            continue
        out[text] = {"kind": kind, "where": where, "text": text}
    return list(out.values())

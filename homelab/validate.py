"""Offline validation of manifests: built-in kinds and custom resources, unknown fields refused.

Built-in kinds go through kubernetes-validate's strict schemas for KUBERNETES_VERSION (it
reports the first problem of an object). Custom resources go through the JSON schemas of
their CRDs in <shared>/crd-schemas/<group>/<kind>_<version>.json (from the CRDs catalog),
closed the way the API server prunes: an object schema that lists properties and neither
allows more (additionalProperties) nor preserves unknown fields accepts no other field, and
metadata is checked as Kubernetes' strict ObjectMeta. A kind with no schema is a problem.

`python -m homelab.validate` renders every component with placeholder secrets and validates
all of it (plus any --extra FILE), one line per problem and a count; exit 1 on any problem.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import referencing
import referencing.jsonschema

KUBERNETES_VERSION = "1.33"
SHARED_ENV = "HOMELAB_SHARED"
REPO = Path(__file__).resolve().parent.parent
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# Placeholders for `python -m homelab.validate`, so the Secrets are rendered and checked too.
PLACEHOLDER_SECRETS = {"CLOUDFLARE_API_TOKEN": "placeholder-cloudflare-token",
                       "HOMELAB_CEPH_CSI_KEY": "AQBplaceholderplaceholderplaceholderplace==",
                       "CLOUDFLARE_TUNNEL_TOKEN": "placeholder-tunnel-token",
                       "TS_OAUTH_CLIENT_ID": "placeholder-client", "TS_OAUTH_CLIENT_SECRET": "placeholder-secret",
                       "GRAFANA_ADMIN_PASSWORD": "placeholder-password", "VAULTWARDEN_ADMIN_TOKEN": "placeholder"}


def shared_dir() -> Path:
    """HOMELAB_SHARED if set, else the repository's sibling ../shared."""
    return Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared")


def identity(obj: Any) -> str:
    """Kind namespace/name (apiVersion) of an object, as far as it has them."""
    if not isinstance(obj, dict):
        return f"<{type(obj).__name__}>"
    meta: dict[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name", "<no name>")
    where = f"{meta['namespace']}/{name}" if meta.get("namespace") else str(name)
    return f"{obj.get('kind', '<no kind>')} {where} ({obj.get('apiVersion', '<no apiVersion>')})"


@functools.cache
def _k8s_definitions() -> dict[str, Any]:
    """kubernetes-validate's strict definitions for KUBERNETES_VERSION (ObjectMeta and friends)."""
    folder = f"v{KUBERNETES_VERSION}.0-local-strict"
    ref = importlib.resources.files("kubernetes_validate").joinpath("kubernetes-json-schema", folder,
                                                                    "_definitions.json")
    loaded: dict[str, Any] = json.loads(ref.read_text(encoding="utf-8"))
    return loaded


def _close(schema: Any) -> Any:
    """A copy of a CRD schema where objects without additionalProperties accept no other field."""
    if isinstance(schema, list):
        return [_close(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _close(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _cr_validator(group: str, version: str, kind: str) -> jsonschema.protocols.Validator | None:
    path = shared_dir() / "crd-schemas" / group / f"{kind.lower()}_{version}.json"
    if not path.is_file():
        return None
    schema = _close(json.loads(path.read_text(encoding="utf-8")))
    definitions = _k8s_definitions()
    props = schema.setdefault("properties", {})
    props["metadata"] = {"$ref": f"{definitions['$id']}#/$defs/{OBJECT_META}"}
    props["apiVersion"] = {"const": f"{group}/{version}"}
    props["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    resource = referencing.Resource.from_contents(definitions, default_specification=referencing.jsonschema.DRAFT202012)
    registry: referencing.Registry[Any] = resource @ referencing.Registry()
    validator: jsonschema.protocols.Validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return validator


def _path(parts: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "<root>"


def _message(error: jsonschema.ValidationError) -> str:
    return f"{_path(error.absolute_path)}: {error.message}"


def _shape(obj: Any) -> str | None:
    """What makes obj no Kubernetes object at all, else None."""
    if not isinstance(obj, dict):
        return f"not an object but a {type(obj).__name__}"
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
        return "apiVersion and kind must be non-empty strings"
    if not isinstance(obj.get("metadata"), dict) or not obj["metadata"].get("name"):
        return "metadata.name is missing"
    return None


def validate(obj: Any) -> list[str]:
    """Problems of one object (empty when it is valid)."""
    shape = _shape(obj)
    if shape is not None:
        return [shape]
    api_version, kind = obj["apiVersion"], obj["kind"]
    group, _, version = api_version.rpartition("/")
    if group:
        validator = _cr_validator(group, version, kind)
        if validator is not None:
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            return [_message(e) for e in errors]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [_message(exc)]
    except kubernetes_validate.SchemaNotFoundError:
        where = f"Kubernetes {KUBERNETES_VERSION} or {shared_dir() / 'crd-schemas'}"
        return [f"unknown kind {kind} in {api_version}: no schema for it in {where}"]
    return []


def validate_all(objects: Iterable[Any]) -> list[str]:
    """Problems of every object, each line naming the object."""
    return [f"{identity(obj)}: {problem}" for obj in objects for problem in validate(obj)]


def _objects(extra: Sequence[str], inventory_path: str | None) -> tuple[list[Any], list[str]]:
    from homelab import inventory, manifests

    inv = inventory.load(inventory_path)
    result = manifests.render(inv, secrets=PLACEHOLDER_SECRETS)
    objects: list[Any] = list(result.objects)
    for name in extra:
        path = Path(name)
        objects += manifests.load_documents(path.read_text(encoding="utf-8"), str(path))
    return objects, result.warnings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m homelab.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], metavar="FILE",
                        help="also validate the manifests in FILE (YAML, several documents allowed)")
    parser.add_argument("--inventory", metavar="PATH", help="the inventory (default: HOMELAB_INVENTORY or the repo's)")
    args = parser.parse_args(argv)
    from homelab.errors import HomelabError
    from homelab.manifests import ManifestError

    try:
        objects, warnings = _objects(args.extra, args.inventory)
    except (HomelabError, ManifestError, OSError) as exc:
        print(f"cannot render the manifests: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        if "placeholder" in warning:
            continue  # the placeholders are this check's own choice
        print(f"warning: {warning}")
    problems = validate_all(objects)
    for problem in problems:
        print(problem)
    print(f"{len(objects)} objects, {len(problems)} problem{'s' if len(problems) != 1 else ''}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

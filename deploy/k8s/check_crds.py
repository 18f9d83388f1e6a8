"""Validate custom resources (KServe's, KEDA's, ...) strictly against their CRDs' schemas, offline.

    python deploy/k8s/check_crds.py --crd servingruntimes.yaml --crd inferenceservices.yaml \\
        deploy/k8s/overlays/kserve

Renders each kustomization with ``kubectl kustomize`` and checks every object whose API group, version and
kind one of the given CustomResourceDefinitions defines against that version's ``openAPIV3Schema``, the
way an API server with strict field validation (``kubectl apply --validate=strict``) would: an unknown
field is an error (unless the schema says ``x-kubernetes-preserve-unknown-fields``), as are wrong types,
missing required fields and values outside an ``enum`` or ``pattern``; ``metadata`` is checked against
the Kubernetes ObjectMeta schema (kubernetes-validate's). Objects of other kinds are listed as not
checked here. Get the CRDs from your cluster (``kubectl get crd servingruntimes.serving.kserve.io -o
yaml``) or from the operator's release. Not checked: CEL rules (``x-kubernetes-validations``), and what
the operator's admission webhooks refuse; ``kubectl apply --dry-run=server`` on a cluster checks those.

Exit status 0 when every checked object is valid, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

KUBERNETES_VERSION = "1.32.0"


def crd_schemas(paths: list[Path]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> the strict JSON schema of that custom resource version."""
    schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                schema = (version.get("schema") or {}).get("openAPIV3Schema")
                if schema is None:
                    raise SystemExit(f"{path}: {spec['names']['kind']} {version['name']} has no openAPIV3Schema")
                schemas[(spec["group"], version["name"], spec["names"]["kind"])] = strict(schema, top=True)
    return schemas


def strict(schema: dict[str, Any], top: bool = False) -> dict[str, Any]:
    """A structural OpenAPI v3 schema as JSON Schema, with unknown fields refused as the API server does."""
    out = copy.deepcopy(schema)
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    for key in list(out):
        if key.startswith("x-kubernetes-"):
            out.pop(key)
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: strict(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if top:  # ObjectMeta: checked with its own schema (problems)
        out.setdefault("properties", {})["metadata"] = {"type": "object"}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def kubernetes_type_problems(value: Any, type_file: str) -> list[str]:
    """``value`` against one Kubernetes type's strict schema as kubernetes-validate ships it (e.g.
    ``objectmeta-meta-v1``, ``container-v1``, ``volume-v1``): for the Kubernetes parts of custom resources."""
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"
    schema = schema_contents(f"{folder}/{type_file}.json", KUBERNETES_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", KUBERNETES_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(value)]


def problems(doc: dict[str, Any], schemas: dict[tuple[str, str, str], dict[str, Any]]) -> list[str] | None:
    """What is wrong with ``doc`` (empty when valid); None when no given CRD defines its kind."""
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    schema = schemas.get((group, version, doc.get("kind", "")))
    if schema is None:
        return None
    validator = jsonschema.Draft7Validator(schema)
    found = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]
    meta = kubernetes_type_problems(doc.get("metadata") or {}, "objectmeta-meta-v1")
    return found + [f"metadata.{problem}" for problem in meta]


def render(directory: Path) -> list[dict[str, Any]]:
    built = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        raise SystemExit(f"kubectl kustomize {directory} failed:\n{built.stderr}")
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crd", type=Path, action="append", required=True, help="a CRD file (repeat)")
    parser.add_argument("kustomizations", type=Path, nargs="+", help="folders that kubectl kustomize renders")
    args = parser.parse_args(argv)
    for path in [*args.crd, *args.kustomizations]:
        if not path.exists():
            parser.error(f"{path} does not exist")
    schemas = crd_schemas(args.crd)
    if not schemas:
        parser.error("no CustomResourceDefinition in the --crd files")
    failed = False
    for directory in args.kustomizations:
        for doc in render(directory):
            name = f"{directory}: {doc['kind']}/{doc['metadata']['name']}"
            found = problems(doc, schemas)
            if found is None:
                print(f"not checked here  {name} ({doc['apiVersion']})")
            elif found:
                failed = True
                print(f"INVALID  {name}")
                for problem in found:
                    print(f"    {problem}")
            else:
                print(f"valid    {name} (against its CRD, strict)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Checks of the KubeRay manifests and ``ray up`` launcher configs under ``cluster/``.

KubeRay custom resources are validated the way the API server would, but strictly:

1. nulls are dropped and schema defaults filled in first (as the API server does), so fields that
   are required but defaulted give no false errors;
2. the CRD schema is copied with ``additionalProperties: false`` on every object that lists its
   properties (the CRDs themselves do not forbid unknown fields, so a misspelt field would pass);
3. checks the schema cannot express: ``submissionMode`` is one of the four modes, a TTL needs
   ``shutdownAfterJobFinishes``, deadlines > 0, ``minReplicas <= replicas <= maxReplicas``, a RayJob
   name of at most 47 characters, image tags and ``rayVersion`` equal to the pinned Ray,
   ``runtimeEnvYAML`` is a Ray ``RuntimeEnv`` with only known fields, and the entrypoint's arguments
   pass the job's own validation (``jobs/pretrain.py --validate-only``).

Launcher YAMLs go through Ray's own ``prepare_config`` and ``validate_config`` (no cloud calls).

  python -m hierdino.cluster_check cluster/kuberay/*.yaml cluster/launcher/*.yaml   # bundled KubeRay v1.7.0 schemas
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import importlib
import importlib.util
import io
import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml

PINNED_RAY = "2.60.0"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
SCHEMA_FILES = {"RayJob": "rayjobs.v1.schema.json", "RayCluster": "rayclusters.v1.schema.json"}


class ManifestError(ValueError):
    """One or more problems in a manifest; the message lists each with its path."""


def drop_nulls(obj):
    if isinstance(obj, dict):
        return {k: drop_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [drop_nulls(v) for v in obj]
    return obj


def fill_defaults(obj, schema: dict):
    """Fill ``default`` values of the schema into ``obj`` where the enclosing object is present."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = fill_defaults(obj[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for k in obj:
                if k not in schema.get("properties", {}):
                    obj[k] = fill_defaults(obj[k], extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [fill_defaults(v, schema["items"]) for v in obj]
    return obj


def strict_schema(schema: dict) -> dict:
    """A copy with ``additionalProperties: false`` on every object that lists its properties."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


BUNDLED_SCHEMAS = Path(__file__).parent / "schemas" / "kuberay-v1.7.0"  # see schemas/README.md


def load_schemas(schema_dir: str | Path = BUNDLED_SCHEMAS) -> dict[str, dict]:
    """The RayJob / RayCluster CRD schemas of a directory (``<name>.json`` or ``<name>.json.gz``)."""
    d, out = Path(schema_dir), {}
    for kind, name in SCHEMA_FILES.items():
        if (d / name).exists():
            out[kind] = json.loads((d / name).read_text())
        elif (d / f"{name}.gz").exists():
            out[kind] = json.loads(gzip.decompress((d / f"{name}.gz").read_bytes()))
        else:
            raise ManifestError(f"{d}: no {name} (or {name}.gz) for {kind}")
    return out


def _schema_errors(doc: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(strict_schema(schema))
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in e.absolute_path) or "<root>"
        out.append(f"{where}: {e.message}")
    return out


def _cluster_spec_errors(spec: dict, where: str) -> list[str]:
    errs = []
    if spec.get("rayVersion") != PINNED_RAY:
        errs.append(f"{where}.rayVersion: {spec.get('rayVersion')!r} != pinned Ray {PINNED_RAY}")
    groups = [("headGroupSpec", spec.get("headGroupSpec", {}))] + [
        (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    for name, g in groups:
        for j, c in enumerate(g.get("template", {}).get("spec", {}).get("containers", [])):
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[-1] if ":" in image else ""
            if image.startswith(("rayproject/ray", "rayproject/ray-ml")) and not tag.startswith(f"{PINNED_RAY}-") and tag != PINNED_RAY:
                errs.append(f"{where}.{name}.template.spec.containers[{j}].image: {image!r} is not Ray {PINNED_RAY}")
            if "ray-ml" in image:
                errs.append(f"{where}.{name}...image: {image!r}: ray-ml images are no longer published")
        if name != "headGroupSpec":
            lo, n, hi = g.get("minReplicas", 0), g.get("replicas", g.get("minReplicas", 0)), g.get("maxReplicas", 0)
            if not lo <= n <= hi:
                errs.append(f"{where}.{name}: needs minReplicas <= replicas <= maxReplicas, got {lo} <= {n} <= {hi}")
    return errs


def _runtime_env_errors(text: str, where: str) -> list[str]:
    from ray.runtime_env import RuntimeEnv  # heavy: only the RayJob runtimeEnvYAML check needs Ray

    try:
        env = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        return [f"{where}: not valid YAML: {e}"]
    unknown = set(env) - set(RuntimeEnv.known_fields)
    if unknown:
        return [f"{where}: unknown RuntimeEnv field(s) {sorted(unknown)}; known: {sorted(RuntimeEnv.known_fields)}"]
    try:
        RuntimeEnv(**env)
    except Exception as e:  # RuntimeEnv raises several types for bad values
        return [f"{where}: not a valid Ray RuntimeEnv: {e}"]
    return []


def _run_job_validation(job: str, args: list[str], where: str) -> list[str]:
    """``jobs/<name>.py ARGS --validate-only`` through its command-line module ``hierdino.cli.<name>``
    (the script is a shim over it), so the check works where only the package is installed."""
    name = Path(job).stem
    if Path(job).parent.name != "jobs" or importlib.util.find_spec(f"hierdino.cli.{name}") is None:
        return [f"{where}: entrypoint script {job} is not one of hierdino's jobs/*.py"]
    module = importlib.import_module(f"hierdino.cli.{name}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            # --offline: the run's storage is the cluster's to reach, not the checking machine's
            rc = module.main(args + ["--validate-only", "--offline"])
        except SystemExit as e:  # argparse errors
            rc = e.code
    return [] if rc == 0 else [f"{where}: `{job} {' '.join(args)} --validate-only` failed: {err.getvalue().strip()}"]


def check_custom_resource(doc: dict, schemas: dict[str, dict]) -> list[str]:
    kind = doc.get("kind")
    if kind not in SCHEMA_FILES:
        return []
    doc = drop_nulls(doc)
    schema = schemas[kind]
    doc = fill_defaults(doc, schema)
    errs = _schema_errors(doc, schema)
    spec = doc.get("spec", {})
    name = doc.get("metadata", {}).get("name", "")
    if kind == "RayJob":
        if len(name) > 47:
            errs.append(f"metadata.name: {name!r} is {len(name)} characters; RayJob names must be <= 47")
        if spec.get("submissionMode") not in SUBMISSION_MODES:
            errs.append(f"spec.submissionMode: {spec.get('submissionMode')!r} is not one of {SUBMISSION_MODES}")
        if spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
            errs.append("spec.ttlSecondsAfterFinished is set but spec.shutdownAfterJobFinishes is not true")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if key in spec and not spec[key] > 0:
                errs.append(f"spec.{key}: must be > 0, got {spec[key]}")
        if "rayClusterSpec" in spec:
            errs += _cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if "runtimeEnvYAML" in spec:
            errs += _runtime_env_errors(spec["runtimeEnvYAML"], "spec.runtimeEnvYAML")
        if "entrypoint" in spec:
            args = shlex.split(spec["entrypoint"])
            if len(args) < 2 or not re.fullmatch(r"python3?", args[0]):
                errs.append(f"spec.entrypoint: expected 'python jobs/<job>.py ...', got {spec['entrypoint']!r}")
            else:
                errs += _run_job_validation(args[1], args[2:], "spec.entrypoint")
    else:
        errs += _cluster_spec_errors(spec, "spec")
    return errs


def check_launcher(config: dict) -> list[str]:
    from ray.autoscaler._private.util import (  # heavy: only launcher configs need Ray
        prepare_config,
        validate_config,
    )

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # jsonschema.ValidationError, ValueError ...
        return [f"ray cluster config: {str(e).splitlines()[0]}"]
    image = config.get("docker", {}).get("image", "")
    if image and not image.split(":")[-1].startswith(PINNED_RAY):
        return [f"docker.image: {image!r} is not Ray {PINNED_RAY}"]
    return []


def check_file(path: str | Path, schemas: dict[str, dict] | None) -> list[str]:
    """Problems of every document in a YAML file (KubeRay CRs need ``schemas``; launcher configs do not)."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    errs = []
    for i, doc in enumerate(docs):
        prefix = f"{path}" + (f"[{i}]" if len(docs) > 1 else "")
        if "provider" in doc and "cluster_name" in doc:
            errs += [f"{prefix}: {e}" for e in check_launcher(doc)]
        elif doc.get("kind") in SCHEMA_FILES:
            if schemas is None:
                raise ManifestError(f"{prefix}: a {doc['kind']} needs the KubeRay CRD schemas (load_schemas())")
            errs += [f"{prefix}: {e}" for e in check_custom_resource(doc, schemas)]
    return errs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hierdino.cluster_check")
    p.add_argument("--schemas", default=str(BUNDLED_SCHEMAS),
                   help="directory with rayjobs.v1.schema.json and rayclusters.v1.schema.json (default: the bundled "
                        "KubeRay v1.7.0 schemas)")
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    schemas = load_schemas(args.schemas)
    errs = [e for f in args.files for e in check_file(f, schemas)]
    print("\n".join(errs) if errs else f"{len(args.files)} file(s) OK")
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline validation of rendered manifests (no API server needed):

    python -m infra.k8s.validate launch/x/*.yaml        # one line per problem; exit 1 if any

- core kinds (ConfigMap, Service, Job, ...): kubernetes-validate's strict schemas for KUBERNETES (unknown
  fields are errors; a kind it has no schema for is an error here, not a warning);
- Kubeflow kinds: every key checked against the API models (TrainJob, TrainingRuntime from
  kubeflow-trainer-api; PyTorchJob from kubeflow-training), then loaded by them for types; the pod and
  Job templates inside are also validated as core `PodTemplate` / `Job` objects by kubernetes-validate.

Tests: `pytest tests/integration/test_k8s_manifests.py`.
"""
from __future__ import annotations

import sys
import typing
from pathlib import Path

import kubernetes_validate
import pydantic
import yaml

KUBERNETES = "1.33"


def _core(doc: dict, where: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.utils.InvalidSchemaError) as e:
        return [f"{where}: {e}"]
    return []


def _pydantic_fields(cls) -> dict[str, object]:
    return {(f.alias or name): f.annotation for name, f in cls.model_fields.items()}


def _walk_pydantic(value, tp, path: str) -> list[str]:
    """Unknown keys anywhere under `value`, typed by the pydantic annotation `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        tp = next((a for a in args if a is not type(None)), tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _walk_pydantic(v, args[0], f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict):
        return [e for k, v in value.items() for e in _walk_pydantic(v, args[1], f"{path}.{k}")]
    if isinstance(tp, type) and hasattr(tp, "model_fields") and isinstance(value, dict):
        fields = _pydantic_fields(tp)
        errors = [f"{path}.{k}: unknown field (valid: {', '.join(sorted(fields))})" for k in value if k not in fields]
        return errors + [e for k, v in value.items() if k in fields for e in _walk_pydantic(v, fields[k], f"{path}.{k}")]
    return []


def _openapi_class(name: str):
    import kubeflow.training.models as kf
    import kubernetes.client.models as k8s

    return getattr(kf, name, None) or getattr(k8s, name, None)


_PRIMITIVE = {"int": int, "str": str, "bool": bool, "float": (int, float), "object": object}


def _walk_openapi(value, tp: str, path: str) -> list[str]:
    """The same walk for openapi-generator classes (kubeflow-training, kubernetes client): types are strings."""
    if tp.startswith("list[") and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _walk_openapi(v, tp[5:-1], f"{path}[{i}]")]
    if tp.startswith("dict(") and isinstance(value, dict):
        inner = tp[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in _walk_openapi(v, inner, f"{path}.{k}")]
    if tp in _PRIMITIVE:
        return [] if isinstance(value, _PRIMITIVE[tp]) and not (tp == "int" and isinstance(value, bool)) else [f"{path}: expected {tp}, got {value!r}"]
    cls = _openapi_class(tp)
    if cls is None or not isinstance(value, dict):
        return [] if cls is None else [f"{path}: expected a mapping ({tp})"]
    fields = {cls.attribute_map[a]: t for a, t in cls.openapi_types.items()}
    errors = [f"{path}.{k}: unknown field (valid: {', '.join(sorted(fields))})" for k in value if k not in fields]
    return errors + [e for k, v in value.items() if k in fields for e in _walk_openapi(v, fields[k], f"{path}.{k}")]


def _pod_template(template: dict, where: str) -> list[str]:
    return _core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"}, "template": template}, where)


def _kubeflow(doc: dict, where: str) -> list[str]:
    kind = doc.get("kind")
    if kind == "PyTorchJob":
        errors = _walk_openapi(doc, "KubeflowOrgV1PyTorchJob", kind)
        for role, replica in doc.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
            errors += _pod_template(replica.get("template", {}), f"{where}: {role} template")
        return [f"{where}: {e}" if not e.startswith(where) else e for e in errors]
    from kubeflow_trainer_api import models as tm

    model = {"TrainJob": tm.TrainerV1alpha1TrainJob, "TrainingRuntime": tm.TrainerV1alpha1TrainingRuntime}[kind]
    errors = [f"{where}: {e}" for e in _walk_pydantic(doc, model, kind)]
    if not errors:
        try:
            model.from_dict(doc)
        except (pydantic.ValidationError, ValueError) as e:  # wrong types, missing required fields
            errors.append(f"{where}: {' '.join(str(e).split())}")
    if kind == "TrainingRuntime":
        for rj in doc["spec"].get("template", {}).get("spec", {}).get("replicatedJobs", []):
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rj["name"]}, "spec": rj["template"]["spec"]}
            errors += _core(job, f"{where}: replicatedJob {rj['name']} as a batch/v1 Job")
    return errors


KUBEFLOW = {("kubeflow.org/v1", "PyTorchJob"), ("trainer.kubeflow.org/v1alpha1", "TrainJob"), ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime")}


def validate_doc(doc: dict, where: str = "") -> list[str]:
    where = f"{where}{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if (doc.get("apiVersion"), doc.get("kind")) in KUBEFLOW:
        return _kubeflow(doc, where)
    return _core(doc, where)


def validate_file(path: Path) -> list[str]:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    return [e for d in docs for e in validate_doc(d, f"{path}: ")]


def main(argv: list[str] | None = None) -> int:
    errors = [e for f in (sys.argv[1:] if argv is None else argv) for e in validate_file(Path(f))]
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Kubernetes manifests for a training run, rendered from a checked `infra.request.Request`:

    trainjob.yaml    Kubeflow Trainer v2: ConfigMap + TrainingRuntime (JobSet template: pod spec, failure
                     policy) + TrainJob (trainer.kubeflow.org/v1alpha1)
    pytorchjob.yaml  Kubeflow training-operator v1: ConfigMap + PyTorchJob (kubeflow.org/v1), Master + Workers
    job.yaml         no operator: ConfigMap + headless Service + Indexed Job (batch/v1), pod i = node i

Every pod: the image (default `infra.image.DEFAULT_IMAGE`) runs `python -m sct.supervise --
torchrun|deepspeed ... -m sct.train --config /etc/sct/train.yaml` as its first process (SIGTERM from
the kubelet reaches every rank, exit 75 after the checkpoint); S3 credentials from a Secret by
reference (secretKeyRef, never a value); /dev/shm a memory emptyDir; run.dir on a PersistentVolumeClaim;
non-root securityContext with no privilege escalation and all capabilities dropped; nvidia.com/gpu
requested per node; terminationGracePeriodSeconds from `--grace-seconds` (longer than a step plus a
checkpoint). Restart on preemption (exit 75, or a pod disrupted by eviction/preemption) without
spending the failure budget: podFailurePolicy (Job; in the TrainingRuntime with a JobSet rule
RestartJobSetAndIgnoreMaxRestarts), restartPolicy OnFailure (PyTorchJob). Every rank resumes from run.dir.

Validation: `python -m infra.k8s.validate FILE ...` (kubernetes-validate --strict + the Kubeflow models).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import yaml

from infra.request import S3_REQUIRED, Request

KINDS = ("trainjob", "pytorchjob", "job")
CONFIG_DIR, PORT = "/etc/sct", 29500
PREEMPTED = 75
UID = 10001  # the image's user (Dockerfile: useradd --uid 10001)


@dataclass
class K8sOptions:
    image: str
    namespace: str = "default"
    pvc: str = "sct-runs"
    pvc_mount: str = "/runs"
    s3_secret: str = "sct-s3"
    grace_seconds: int = 600
    shm: str = "16Gi"
    cpu: str | None = None
    memory: str | None = None
    backoff_limit: int = 20


def _env(req: Request, opts: K8sOptions) -> list[dict]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": k, "value": v} for k, v in req.env.items()]
    for name in req.pass_env:  # by reference: the value lives in the Secret
        ref = {"name": opts.s3_secret, "key": name}
        if name not in S3_REQUIRED:
            ref["optional"] = True
        env.append({"name": name, "valueFrom": {"secretKeyRef": ref}})
    return env


def _resources(req: Request, opts: K8sOptions) -> dict:
    requests = {k: v for k, v in (("cpu", opts.cpu), ("memory", opts.memory)) if v}
    limits = {}
    if req.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(req.gpus_per_node)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _command(req: Request, rdzv: dict[str, str]) -> list[str]:
    """The container command. `rdzv` names how this pod learns its node rank and the master
    (Kubernetes expands $(VAR) from the container's environment)."""
    train = ["-m", "sct.train", "--config", f"{CONFIG_DIR}/train.yaml"] if req.launcher == "torchrun" else ["--module", "sct.train", "--config", f"{CONFIG_DIR}/train.yaml"]
    sup = ["python3", "-m", "sct.supervise", "--", "python3"]
    if req.launcher == "torchrun":
        return [*sup, "-m", "torch.distributed.run", *rdzv["torchrun"], *train]
    return [*sup, "-m", "deepspeed.launcher.runner", "--hostfile", f"{CONFIG_DIR}/hostfile", "--no_ssh", *rdzv["deepspeed"], *train]


def _container(req: Request, opts: K8sOptions, name: str, command: list[str] | None) -> dict:
    c = {"name": name, "image": opts.image}
    if command is not None:
        c["command"] = command
    c |= {"env": _env(req, opts), "resources": _resources(req, opts),
          "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                           {"name": "runs", "mountPath": opts.pvc_mount},
                           {"name": "shm", "mountPath": "/dev/shm"}],
          "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    return c


def _pod_spec(req: Request, opts: K8sOptions, container: dict, restart: str | None) -> dict:
    spec = {"securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": opts.grace_seconds,
            "containers": [container],
            "volumes": [{"name": "config", "configMap": {"name": f"{req.name}-config"}},
                        {"name": "runs", "persistentVolumeClaim": {"claimName": opts.pvc}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm}}]}
    if restart:
        spec["restartPolicy"] = restart
    return spec


def _meta(req: Request, opts: K8sOptions, name: str, labels: dict | None = None) -> dict:
    return {"name": name, "namespace": opts.namespace, "labels": {"app.kubernetes.io/name": "sct", "app.kubernetes.io/instance": req.name, **(labels or {})}}


def _config_map(req: Request, opts: K8sOptions, hosts: list[str]) -> dict:
    data = {"train.yaml": req.train_yaml}
    if req.launcher == "deepspeed":  # --no_ssh: the hostfile only sizes the world; each pod runs its own node rank
        data["hostfile"] = "".join(f"{h} slots={req.procs_per_node}\n" for h in hosts)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(req, opts, f"{req.name}-config"), "data": data}


def _pod_failure_policy(container: str) -> dict:
    """Exit 75 (checkpointed) and disruption (eviction, preemption) restart without spending the budget."""
    return {"rules": [{"action": "Ignore", "onExitCodes": {"containerName": container, "operator": "In", "values": [PREEMPTED]}},
                      {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}


def indexed_job(req: Request, opts: K8sOptions) -> list[dict]:
    name, n = req.name, req.nodes
    master = f"{name}-0.{name}"  # pod 0 of the Indexed Job, through the headless Service
    rdzv = {"torchrun": [f"--nnodes={n}", f"--nproc-per-node={req.procs_per_node}", "--rdzv-backend=c10d",
                         f"--rdzv-endpoint={master}:{PORT}", f"--rdzv-id={name}"],
            "deepspeed": ["--node_rank=$(JOB_COMPLETION_INDEX)", f"--master_addr={master}", f"--master_port={PORT}"]}
    pod = _pod_spec(req, opts, _container(req, opts, "trainer", _command(req, rdzv)), "Never")
    pod["subdomain"] = name
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(req, opts, name),
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"batch.kubernetes.io/job-name": name},
                        "ports": [{"name": "rendezvous", "port": PORT, "targetPort": PORT}]}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(req, opts, name),
           "spec": {"completionMode": "Indexed", "completions": n, "parallelism": n, "backoffLimit": opts.backoff_limit,
                    "podFailurePolicy": _pod_failure_policy("trainer"),
                    "template": {"metadata": {"labels": _meta(req, opts, name)["labels"]}, "spec": pod}}}
    return [_config_map(req, opts, [f"{name}-{i}.{name}" for i in range(n)]), service, job]


def pytorchjob(req: Request, opts: K8sOptions) -> list[dict]:
    # the operator sets PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT (torchrun reads them) and RANK / MASTER_ADDR / MASTER_PORT
    rdzv = {"torchrun": [f"--nproc-per-node={req.procs_per_node}"],
            "deepspeed": ["--node_rank=$(RANK)", "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)"]}
    container = _container(req, opts, "pytorch", _command(req, rdzv))  # the operator requires the name "pytorch"
    replica = {"replicas": 1, "restartPolicy": "OnFailure", "template": {"spec": _pod_spec(req, opts, container, None)}}
    specs = {"Master": replica}
    if req.nodes > 1:
        specs["Worker"] = copy.deepcopy(replica) | {"replicas": req.nodes - 1}
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _meta(req, opts, req.name),
           "spec": {"nprocPerNode": str(req.procs_per_node), "runPolicy": {"backoffLimit": opts.backoff_limit, "cleanPodPolicy": "Running"},
                    "pytorchReplicaSpecs": specs}}
    hosts = [f"{req.name}-master-0"] + [f"{req.name}-worker-{i}" for i in range(req.nodes - 1)]
    return [_config_map(req, opts, hosts), job]


def trainjob(req: Request, opts: K8sOptions) -> list[dict]:
    # Trainer v2's torch plugin sets PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT
    rdzv = {"torchrun": [], "deepspeed": ["--node_rank=$(PET_NODE_RANK)", "--master_addr=$(PET_MASTER_ADDR)", "--master_port=$(PET_MASTER_PORT)"]}
    runtime_name = f"{req.name}-runtime"
    container = _container(req, opts, "node", None)  # image, command, env, resources: from the TrainJob's trainer
    for key in ("image", "env", "resources"):
        container.pop(key)
    pod = _pod_spec(req, opts, container, "Never")
    job_spec = {"backoffLimit": 0, "podFailurePolicy": {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [PREEMPTED]}},
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
        "template": {"spec": pod}}
    runtime = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainingRuntime", "metadata": _meta(req, opts, runtime_name),
               "spec": {"mlPolicy": {"numNodes": req.nodes, "torch": {}},
                        "template": {"spec": {
                            # a pod that failed by the rules above (preempted, checkpointed) restarts the whole JobSet for free
                            "failurePolicy": {"maxRestarts": opts.backoff_limit, "rules": [
                                {"name": "preempted", "action": "RestartJobSetAndIgnoreMaxRestarts", "onJobFailureReasons": ["PodFailurePolicy"]}]},
                            "replicatedJobs": [{"name": "node", "replicas": 1,
                                                "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                                                             "spec": job_spec}}]}}}}
    trainer = {"image": opts.image, "command": _command(req, rdzv), "env": _env(req, opts), "numNodes": req.nodes,
               "numProcPerNode": req.procs_per_node}
    if _resources(req, opts):
        trainer["resourcesPerNode"] = _resources(req, opts)
    job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": _meta(req, opts, req.name),
           "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": runtime_name}, "trainer": trainer}}
    hosts = [f"{req.name}-node-0-{i}" for i in range(req.nodes)]
    return [_config_map(req, opts, hosts), runtime, job]


def dump(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, width=1 << 16)


def render(req: Request, opts: K8sOptions) -> dict[str, str]:
    return {f"{kind}.yaml": dump(build(req, opts)) for kind, build in (("trainjob", trainjob), ("pytorchjob", pytorchjob), ("job", indexed_job))}


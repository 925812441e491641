"""Cluster launchers rendered from an sct config: `python -m infra.launch slurm|k8s ...` (docs/launch.md).

    infra/request.py   the config + cluster options, checked (impossible requests exit 2)
    infra/slurm/       the sbatch script (requeue on exit 75, SIGUSR1 before the time limit)
    infra/k8s/         Kubeflow TrainJob, PyTorchJob, and an Indexed Job + headless Service
    infra/image.py     the default container image
"""

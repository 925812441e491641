# The sct image that the launcher templates name by default (infra/image.py: DEFAULT_IMAGE). From the repo root:
#     docker build -t sct:0.1.0 .
#     docker run --gpus all -v "$PWD/runs:/workspace/runs" sct:0.1.0 sct-train --config /opt/sct/configs/demo_cpu.yaml
# Base: the CUDA 13.0 runtime, the CUDA of torch 2.14.1's default wheel (pyproject.toml pins it; the wheel brings
# its own CUDA libraries). sct is installed exactly as CI installs it: scripts/env.sh, which pip-installs the repo's
# own pyproject.toml with the same extras into /opt/sct/.venv (tests/unit/test_container.py checks this).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

# python3-dev and gcc: Triton builds its CUDA launcher at run time (the attention-with-tangent kernel)
# (unpinned apt versions, hadolint DL3008: the base image's Ubuntu release fixes them)
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sct
COPY . /opt/sct
RUN PIP_NO_CACHE_DIR=1 bash scripts/env.sh

# A numeric non-root user, so that Kubernetes' runAsNonRoot can verify it; runs are written under /workspace
RUN useradd --create-home --uid 10001 --user-group sct && mkdir -p /workspace && chown 10001:10001 /workspace
ENV PATH=/opt/sct/.venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/home/sct/.cache/torch_extensions \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="sct" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Consistency models at scale: iCT, TrigFlow teachers, sCT and sCD with DeepSpeed"
USER 10001:10001
WORKDIR /workspace
CMD ["sct-train", "--help"]

"""The container image definition (Dockerfile) against CI and the project: it installs the requirement set that CI
installs (both through scripts/env.sh, which pip-installs the repo's pyproject.toml with the same extras), it runs as
a numeric non-root user, its tag and version label are pyproject's version, and its CUDA base is the CUDA of the
pinned torch wheel. No container engine runs here, so the image is not built by this test."""
import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import torch

from infra.image import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def _pip_installs(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"\bpip3?\b.*\binstall\b", line) and not line.lstrip().startswith("#")]


def test_image_installs_the_requirement_set_that_ci_installs():
    env_sh = (ROOT / "scripts" / "env.sh").read_text()
    (install,) = _pip_installs(env_sh)  # the project's one install: the repo's pyproject.toml with its extras
    extras = re.search(r'-e "\$root\[([\w,-]+)\]"', install).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    # CI: .ci/run -> scripts/test.sh, which sources scripts/env.sh; nothing else installs Python packages
    ci, test_sh = (ROOT / ".ci" / "run").read_text(), (ROOT / "scripts" / "test.sh").read_text()
    assert re.search(r"^bash scripts/test\.sh\b", ci, re.M) and 'source "$(dirname "$0")/env.sh"' in test_sh
    assert not _pip_installs(ci) and not _pip_installs(test_sh)
    # the image: the whole repo copied in, then scripts/env.sh, and no other pip install
    steps = instructions()
    runs = [args for ins, args in steps if ins == "RUN"]
    (env_run,) = [i for i, (ins, args) in enumerate(steps) if ins == "RUN" and re.search(r"\bbash scripts/env\.sh\b", args)]
    assert any(ins == "COPY" and args.split()[0] == "." for ins, args in steps[:env_run])
    assert not any(_pip_installs(r) for r in runs)
    ignored = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for needed in ("pyproject.toml", "scripts/env.sh", "sct/train.py", "pipelines/data.py", "infra/image.py", "configs/demo_cpu.yaml"):
        assert not any(fnmatch.fnmatch(needed, p) or needed.startswith(p + "/") for p in ignored), needed


def test_image_runs_as_a_numeric_non_root_user():
    steps = instructions()
    users = [args for ins, args in steps if ins == "USER"]
    assert users, "the Dockerfile sets no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: Kubernetes' runAsNonRoot can only verify a numeric user
    assert any(ins == "RUN" and re.search(rf"useradd\b.*--uid {uid}\b", args) for ins, args in steps)


def test_image_tag_and_label_carry_the_project_version():
    version = PYPROJECT["project"]["version"]
    assert DEFAULT_IMAGE == f"sct:{version}"
    labels = " ".join(args for ins, args in instructions() if ins == "LABEL")
    assert f'org.opencontainers.image.version="{version}"' in labels
    assert f"docker build -t {DEFAULT_IMAGE} ." in (ROOT / "Dockerfile").read_text()


def test_cuda_base_matches_the_pinned_torch_wheel():
    pin = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    if torch.__version__.split("+")[0] != pin:
        pytest.skip(f"installed torch {torch.__version__} is not the pinned {pin}: its CUDA says nothing about the pin")
    (base,) = [args for ins, args in instructions() if ins == "FROM"]
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\d+\.\d+", base)
    assert match, f"expected an nvidia/cuda runtime base, got {base}"
    assert match.group(1) == torch.version.cuda, f"base CUDA {match.group(1)} != torch {pin}'s CUDA {torch.version.cuda}"

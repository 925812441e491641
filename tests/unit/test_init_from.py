"""`model.init_from`: a run starts from a snapshot's weights (sCM's θ ← θ_pretrain), and a snapshot of
another architecture or a missing file is a ConfigError naming the key."""
import pytest
import torch

from sct.checkpoint import save_snapshot
from sct.config import ConfigError, to_dict
from sct.experiment import ModelConfig, build_model, init_from_snapshot
from sct.models.mlp import MLPConfig


def _model(hidden: int) -> tuple[ModelConfig, torch.nn.Module]:
    cfg = ModelConfig(backbone=MLPConfig(hidden=hidden, depth=1))
    return cfg, build_model(cfg)


def test_init_from_loads_the_snapshot_weights(tmp_path):
    torch.manual_seed(0)
    cfg, teacher = _model(16)
    for p in teacher.parameters():
        p.data.normal_()
    save_snapshot(tmp_path / "teacher.safetensors", teacher.state_dict(), {"model": to_dict(cfg)})
    _, student = _model(16)
    init_from_snapshot(student, str(tmp_path / "teacher.safetensors"))
    for (name, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_from_names_the_key_for_a_wrong_architecture_or_missing_file(tmp_path):
    cfg, teacher = _model(16)
    save_snapshot(tmp_path / "teacher.safetensors", teacher.state_dict(), {"model": to_dict(cfg)})
    _, wider = _model(32)
    with pytest.raises(ConfigError, match=r"model\.init_from.*does not fit"):
        init_from_snapshot(wider, str(tmp_path / "teacher.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.init_from.*not found"):
        init_from_snapshot(wider, str(tmp_path / "missing.safetensors"))

"""The top-level config tree of a training run, its cross-component rules, and the builders.

Each component owns its dataclass (DESIGN rule 5); this module only composes them, rejects impossible
combinations with the dotted key (rule 6), and turns a config into objects:
`build_model`, `build_objective`, `load_snapshot_model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from pipelines.data import ArrayDataConfig, ShardDataConfig, data_shape, num_classes
from sct.checkpoint import load_snapshot
from sct.config import ConfigError, from_dict, to_dict
from sct.decode import latent_entry
from sct.dist import DistConfig
from sct.ema import EMAConfig
from sct.loop import LoopConfig
from sct.models.dit import DiTConfig, build_dit
from sct.models.mlp import MLPConfig, build_mlp
from sct.models.precond import EDMConsistency, EDMConsistencyConfig, TrigFlow, TrigFlowConfig
from sct.models.unet import UNetConfig, build_unet
from sct.objectives.diffusion import DiffusionConfig, TrigFlowDiffusion
from sct.objectives.ict import ICT, ICTConfig
from sct.objectives.scm import SCM, DataVelocity, SCDConfig, SCTConfig, TeacherVelocity
from sct.optim import OptimizerConfig
from sct.samplers import SamplingConfig

BACKBONES = {"unet": build_unet, "dit": build_dit, "mlp": build_mlp}
PARAMETERIZATION_OF = {"ict": "edm_consistency", "diffusion": "trigflow", "sct": "trigflow", "scd": "trigflow"}


@dataclass
class ModelConfig:
    backbone: UNetConfig | DiTConfig | MLPConfig = field(default_factory=UNetConfig)
    precond: TrigFlowConfig | EDMConsistencyConfig = field(default_factory=TrigFlowConfig)
    init_from: str = ""  # inference snapshot whose weights start the run (sCM starts sCD/sCT from the TrigFlow teacher)


@dataclass
class TrainConfig:
    run: LoopConfig = field(default_factory=LoopConfig)
    data: ArrayDataConfig | ShardDataConfig = field(default_factory=ArrayDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: SCTConfig | SCDConfig | ICTConfig | DiffusionConfig = field(default_factory=SCTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def check(self) -> None:
        wanted = PARAMETERIZATION_OF[self.objective.name]
        if self.model.precond.name != wanted:
            raise ConfigError("model.precond.name", f"objective '{self.objective.name}' needs precond '{wanted}', got '{self.model.precond.name}'")
        backbone, shape, classes = self.model.backbone, data_shape(self.data), num_classes(self.data)
        if backbone.label_dim != classes:
            raise ConfigError("model.backbone.label_dim", f"the data has {classes} classes (data.class_conditional={self.data.class_conditional}), got label_dim={backbone.label_dim}")
        if isinstance(backbone, (UNetConfig, DiTConfig)) and shape != (backbone.img_channels, backbone.img_resolution, backbone.img_resolution):
            raise ConfigError("model.backbone", f"data samples are {shape}, the {backbone.name} expects ({backbone.img_channels}, {backbone.img_resolution}, {backbone.img_resolution})")
        if isinstance(backbone, MLPConfig) and shape != (backbone.dim,):
            raise ConfigError("model.backbone.dim", f"data samples are {shape}, the MLP expects ({backbone.dim},)")
        if (self.sampling.method == "ode") != (self.objective.name == "diffusion"):
            raise ConfigError("sampling.method", f"objective '{self.objective.name}' samples with method '{'ode' if self.objective.name == 'diffusion' else 'consistency'}'")
        if self.sampling.vae and not isinstance(self.data, ShardDataConfig):
            raise ConfigError("sampling.vae", "only latent shard data (python -m pipelines.encode) is decoded through a VAE")
        if self.sampling.guidance != 1.0 and classes == 0:
            raise ConfigError("sampling.guidance", "classifier-free guidance needs class-conditional data")


def build_model(cfg: ModelConfig) -> nn.Module:
    """precond(backbone) from the model config."""
    backbone = BACKBONES[cfg.backbone.name](cfg.backbone)
    if cfg.precond.name == "trigflow":
        return TrigFlow(backbone, cfg.precond)
    return EDMConsistency(backbone, cfg.precond)


def init_from_snapshot(net: nn.Module, path: str) -> None:
    """Load a snapshot's weights into a freshly built model; a missing file or another architecture is a ConfigError."""
    if not Path(path).is_file():
        raise ConfigError("model.init_from", f"snapshot not found: {path}")
    state, _ = load_snapshot(Path(path))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError("model.init_from", f"{path} does not fit model.backbone/model.precond: {str(e).splitlines()[0]}") from None


def load_snapshot_model(path: str | Path) -> tuple[nn.Module, dict]:
    """An inference snapshot as (ready-to-sample module in eval mode, stored model/sampling/shape config)."""
    state, stored = load_snapshot(Path(path))
    model = build_model(from_dict(ModelConfig, stored["model"], source=str(path)))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False), stored


def build_objective(cfg: TrainConfig) -> nn.Module:
    obj, precond = cfg.objective, cfg.model.precond
    if isinstance(obj, ICTConfig):
        return ICT(obj, cfg.run.total_steps, precond.sigma_min, precond.sigma_max)
    if isinstance(obj, DiffusionConfig):
        return TrigFlowDiffusion(obj, precond.sigma_data)
    if isinstance(obj, SCDConfig):
        if not Path(obj.teacher).is_file():
            raise ConfigError("objective.teacher", f"teacher snapshot not found: {obj.teacher}")
        teacher, _ = load_snapshot_model(obj.teacher)
        if not isinstance(teacher, TrigFlow):
            raise ConfigError("objective.teacher", f"{obj.teacher} is not a TrigFlow model")
        return SCM(obj, precond.sigma_data, TeacherVelocity(teacher, obj.guidance_scale))
    return SCM(obj, precond.sigma_data, DataVelocity())


def snapshot_config(cfg: TrainConfig, manifest: dict | None = None) -> dict:
    """What a snapshot needs besides weights: how to build the model, how to sample it, the sample shape, and
    for latent shards (`manifest`) how to decode samples: the latent statistics and the VAE (sct.decode)."""
    return {"model": to_dict(cfg.model), "sampling": to_dict(cfg.sampling), "shape": list(data_shape(cfg.data)),
            "latent": latent_entry(manifest, cfg.sampling.vae)}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


"""The top-level config tree of a training run, its cross-component rules, and the builders.

Each component owns its dataclass (DESIGN rule 5); this module only composes them, rejects impossible
combinations with the dotted key (rule 6), and turns a config into objects:
`build_model`, `build_objective`, `load_snapshot_model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from torch import nn

from pipelines.data import ArrayDataConfig, ShardDataConfig, data_shape, num_classes
from sct.config import ConfigError, from_dict, to_dict
from sct.decode import latent_entry
from sct.dist import DistConfig
from sct.ema import EMAConfig
from sct.eval_training import check_eval
from sct.evaluate import EvalConfig
from sct.guidance import GUIDANCE_KEYS, check_guidance, check_teacher_guidance
from sct.loop import LoopConfig
from sct.models.dit import DiTConfig, build_dit
from sct.models.mlp import MLPConfig, build_mlp
from sct.models.precond import EDMConsistency, EDMConsistencyConfig, TrigFlow, TrigFlowConfig
from sct.models.speed import channels_last
from sct.models.unet import UNetConfig, build_unet
from sct.objectives.diffusion import DiffusionConfig, TrigFlowDiffusion
from sct.objectives.ict import ICT, ICTConfig
from sct.objectives.scm import SCM, DataVelocity, SCDConfig, SCTConfig, TeacherVelocity
from sct.optim import OptimizerConfig
from sct.samplers import SamplingConfig
from sct.snapshots import check_teacher, open_snapshot
from sct.tracking import TrackingConfig

BACKBONES = {"unet": build_unet, "dit": build_dit, "mlp": build_mlp}
PARAMETERIZATION_OF = {"ict": "edm_consistency", "diffusion": "trigflow", "sct": "trigflow", "scd": "trigflow"}


@dataclass
class ModelConfig:
    backbone: UNetConfig | DiTConfig | MLPConfig = field(default_factory=UNetConfig)
    precond: TrigFlowConfig | EDMConsistencyConfig = field(default_factory=TrigFlowConfig)
    init_from: str = ""  # inference snapshot whose weights start the run (sCM starts sCD/sCT from the TrigFlow teacher)
    channels_last: bool = False  # convolutions in NHWC memory format (sct.models.speed)
    compile: Literal["none", "backbone"] = "none"  # torch.compile of the backbone's gradient forward/backward (sct.models.speed)
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager": no code generation, for tests)


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # metrics during training (sct.eval_training)

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
        check_eval(self.eval, shape)
        if self.sampling.guidance != 1.0 and classes == 0:
            raise ConfigError("sampling.guidance", "classifier-free guidance needs class-conditional data")
        check_guidance(self)


def build_model(cfg: ModelConfig) -> nn.Module:
    """precond(backbone) from the model config."""
    backbone = BACKBONES[cfg.backbone.name](cfg.backbone)
    net = TrigFlow(backbone, cfg.precond) if cfg.precond.name == "trigflow" else EDMConsistency(backbone, cfg.precond)
    return channels_last(net) if cfg.channels_last else net


def init_from_snapshot(net: nn.Module, path: str) -> None:
    """Load a snapshot's weights into a freshly built model; a missing, unreadable file or another architecture is a ConfigError."""
    state, _ = open_snapshot(path, "model.init_from")
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if GUIDANCE_KEYS not in k]  # a guidance-conditioned student from its teacher
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    except RuntimeError as e:
        raise ConfigError("model.init_from", f"{path} does not fit model.backbone/model.precond: {str(e).splitlines()[0]}") from None


def load_snapshot_model(path: str | Path, key: str = "snapshot", check=None) -> tuple[nn.Module, dict]:
    """An inference snapshot as (ready-to-sample module in eval mode, stored model/sampling/shape config);
    any problem with the file is a ConfigError naming `key` (the config key or option that named it).
    `check(stored)` runs before the model is built (and may raise its own ConfigError)."""
    state, stored = open_snapshot(path, key)
    if check is not None:
        check(stored)
    try:
        model = build_model(from_dict(ModelConfig, stored["model"], source=str(path)))
        model.load_state_dict(state)
    except ConfigError as e:
        raise ConfigError(key, f"its stored model config is invalid: {e}") from None
    except RuntimeError as e:
        raise ConfigError(key, f"{path}: the weights do not fit its stored model config: {str(e).splitlines()[0]}") from None
    return model.eval().requires_grad_(False), stored


def build_objective(cfg: TrainConfig) -> nn.Module:
    obj, precond = cfg.objective, cfg.model.precond
    if isinstance(obj, ICTConfig):
        return ICT(obj, cfg.run.total_steps, precond.sigma_min, precond.sigma_max)
    if isinstance(obj, DiffusionConfig):
        return TrigFlowDiffusion(obj, precond.sigma_data)
    if isinstance(obj, SCDConfig):
        fits = partial(check_teacher, path=obj.teacher, shape=data_shape(cfg.data), classes=num_classes(cfg.data))
        teacher, stored = load_snapshot_model(obj.teacher, "objective.teacher", check=fits)  # a TrigFlow model: checked
        check_teacher_guidance(obj, stored)
        return SCM(obj, precond.sigma_data, TeacherVelocity(teacher))  # SCM sets the guidance from obj.guidance_scale
    return SCM(obj, precond.sigma_data, DataVelocity())


def snapshot_config(cfg: TrainConfig, manifest: dict | None = None) -> dict:
    """What a snapshot needs besides weights: how to build the model, how to sample it, the sample shape, and
    for latent shards (`manifest`) how to decode samples: the latent statistics and the VAE (sct.decode)."""
    return {"model": to_dict(cfg.model), "sampling": to_dict(cfg.sampling), "shape": list(data_shape(cfg.data)),
            "objective": to_dict(cfg.objective),  # sct.snapshots.check_teacher (name), sct.guidance (label_dropout)
            "latent": latent_entry(manifest, cfg.sampling.vae)}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


"""Classifier-free guidance across components: the rules that tie the objective, the backbone, the
sampler and the sCD teacher together (DESIGN rule 6), kept out of the composition root.

- `check_guidance(cfg)`: a guidance-conditioned student (`objective.guidance_max > 1`, sCM Table 4) needs
  `model.backbone.guidance_embedding` and class labels, and the backbone input is used only then;
  consistency sampling at `sampling.guidance != 1` needs that input and a scale inside [1, guidance_max].
- `check_teacher_guidance(objective, stored)`: guiding the teacher (`objective.guidance_scale != 1` or
  `objective.guidance_max > 1`) needs a teacher trained with `objective.label_dropout > 0`, read from the
  config stored in its snapshot; otherwise its unconditional branch was never trained.
- `GUIDANCE_KEYS`: the parameters a guidance-conditioned student has and its teacher has not (they
  start at zero, so `model.init_from` a teacher leaves them as built).
Tests: `pytest tests/unit/test_guidance.py`.
"""
from __future__ import annotations

from sct.config import ConfigError

GUIDANCE_KEYS = ".map_guidance."


def check_guidance(cfg) -> None:
    """Cross-component guidance rules of a `TrainConfig` (called from its check())."""
    obj, backbone, sampling = cfg.objective, cfg.model.backbone, cfg.sampling
    gmax = getattr(obj, "guidance_max", 1.0)
    has_input = getattr(backbone, "guidance_embedding", False)
    if gmax > 1 and not has_input:
        raise ConfigError("model.backbone.guidance_embedding", f"objective.guidance_max={gmax} trains a guidance-conditioned "
                          f"student: set model.backbone.guidance_embedding: true (a unet or dit backbone)")
    if has_input and gmax <= 1:
        raise ConfigError("model.backbone.guidance_embedding", "the guidance input is trained only by sCD with objective.guidance_max > 1")
    if gmax > 1 and backbone.label_dim == 0:
        raise ConfigError("objective.guidance_max", "classifier-free guidance needs class-conditional data")
    if sampling.method == "consistency" and sampling.guidance != 1.0:
        if not has_input:
            raise ConfigError("sampling.guidance", "a consistency model takes a guidance scale only when it was trained "
                              "guidance-conditioned (objective.guidance_max > 1, model.backbone.guidance_embedding)")
        if not 1.0 <= sampling.guidance <= gmax:
            raise ConfigError("sampling.guidance", f"the student was trained on scales in [1, {gmax}] (objective.guidance_max), got {sampling.guidance}")


def check_teacher_guidance(obj, stored: dict) -> None:
    """`obj` an `SCDConfig`, `stored` the config in its teacher's snapshot; a ConfigError if the teacher cannot be guided."""
    key, value = ("objective.guidance_max", obj.guidance_max) if obj.guidance_max > 1 else ("objective.guidance_scale", obj.guidance_scale)
    if value == 1.0:
        return
    dropout = (stored.get("objective") or {}).get("label_dropout")
    if not dropout or dropout <= 0:
        recorded = "records no objective config" if dropout is None else f"has objective.label_dropout={dropout}"
        raise ConfigError(key, f"{key}={value} guides the teacher, but {obj.teacher} {recorded}: a teacher trained without "
                          f"label dropout has no unconditional branch. Train it with objective.label_dropout > 0 (e.g. 0.1) "
                          f"or set {key}: 1")

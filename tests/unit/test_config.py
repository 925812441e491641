"""sct.config: strict YAML -> dataclass loading, overrides, dumping, CLI. Run: pytest tests/unit/test_config.py"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from sct.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load,
    parse_cli,
    save_yaml,
    to_dict,
    to_yaml,
)


@dataclass
class ICT:
    name: Literal["ict"] = "ict"
    p_mean: float = -1.1
    p_std: float = 2.0


@dataclass
class SCT:
    name: Literal["sct"] = "sct"
    tangent_warmup: int = 10_000
    weighting: Literal["adaptive", "none"] = "adaptive"


@dataclass
class Model:
    channels: int
    mults: tuple[int, ...] = (1, 2, 2)
    attn_res: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0
    label_dim: int | None = None

    def check(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class Train:
    model: Model
    objective: ICT | SCT = field(default_factory=lambda: SCT(tangent_warmup=7))
    lr: float = 1e-4
    use_fp16: bool = False
    tags: dict[str, str] = field(default_factory=dict)

    def check(self):
        if isinstance(self.objective, SCT) and self.use_fp16:
            raise ConfigError("objective.name", "sCT's JVP is unstable in fp16; use_fp16=false")


@dataclass
class Holder:
    train: Train


def write(tmp_path, text, name="demo.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


FULL = {
    "model": {"channels": 64, "mults": [1, 2], "attn_res": [8, 4], "dropout": 0.1, "label_dim": 10},
    "objective": {"name": "ict", "p_mean": -1.0, "p_std": 1.5},
    "lr": 3e-4,
    "use_fp16": True,
    "tags": {"run": "a"},
}


def test_round_trip_dict_and_yaml(tmp_path):
    cfg = from_dict(Train, FULL)
    assert cfg.model.mults == (1, 2) and isinstance(cfg.model.mults, tuple)
    assert isinstance(cfg.objective, ICT) and cfg.objective.p_std == 1.5
    plain = to_dict(cfg)
    assert plain == FULL  # tuples dumped as lists, everything else unchanged
    assert from_dict(Train, plain) == cfg
    path = write(tmp_path, to_yaml(cfg), "resolved.yaml")
    assert load(Train, path) == cfg


def test_defaults_fill_missing_keys():
    cfg = from_dict(Train, {"model": {"channels": 32}})
    assert cfg == Train(model=Model(channels=32), objective=SCT(tangent_warmup=7))
    assert from_dict(Train, {"model": {"channels": 32}, "lr": 2}).lr == 2.0
    assert isinstance(from_dict(Train, {"model": {"channels": 32}, "lr": 2}).lr, float)


def test_unknown_key_names_dotted_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "model: {channels: 8}\nobjective:\n  name: ict\n  p_mena: 0.5\n")
    msg = error(load, Train, path)
    assert msg.startswith(f"{path}: objective.p_mena: unknown key")
    assert "did you mean 'p_mean'?" in msg and "valid keys: name, p_mean, p_std" in msg
    assert "override" not in msg


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"model": {"channels": True}}, "model.channels: expected int, got bool True"),
        ({"model": {"channels": 8.0}}, "model.channels: expected int, got float 8.0"),
        ({"lr": "abc"}, "lr: expected float, got str 'abc'"),
        ({"lr": False}, "lr: expected float, got bool False"),
        ({"use_fp16": 1}, "use_fp16: expected bool, got int 1"),
        ({"objective": {"weighting": "adaptiv"}}, "objective.weighting: expected one of 'adaptive', 'none', got str 'adaptiv'; did you mean 'adaptive'?"),
        ({"model": {"channels": 8, "attn_res": [16, "x"]}}, "model.attn_res[1]: expected int, got str 'x'"),
        ({"model": {"channels": 8, "mults": 2}}, "model.mults: expected a list"),
        ({"model": {"channels": None}}, "model.channels: expected int, got null"),
        ({"tags": {"run": 3}}, "tags.run: expected str, got int 3"),
        ({"model": 8}, "model: expected a mapping for Model, got int 8"),
    ],
)
def test_wrong_types(patch, expected):
    data = {"model": {"channels": 8}, **patch}
    msg = error(from_dict, Train, data, source="x.yaml")
    assert msg.startswith(f"x.yaml: {expected}"), msg


def test_optional_accepts_null_and_value():
    assert from_dict(Model, {"channels": 1, "label_dim": None}).label_dim is None
    assert from_dict(Model, {"channels": 1, "label_dim": 10}).label_dim == 10


def test_missing_required_key():
    assert error(from_dict, Train, {}) == "<dict>: model: missing required key"
    assert error(from_dict, Holder, {"train": {"model": {}}}) == "<dict>: train.model.channels: missing required key"


def test_tagged_union_by_name_default_and_unknown():
    base = {"model": {"channels": 8}}
    assert from_dict(Train, {**base, "objective": {"name": "ict"}}).objective == ICT()
    # explicit name of the default member also starts from the field's default instance
    assert from_dict(Train, {**base, "objective": {"name": "sct"}}).objective == SCT(tangent_warmup=7)
    # no name: the mapping updates the default member (SCT with tangent_warmup=7)
    objective = from_dict(Train, {**base, "objective": {"weighting": "none"}}).objective
    assert objective == SCT(tangent_warmup=7, weighting="none")
    msg = error(from_dict, Train, {**base, "objective": {"p_mean": 0.0}})
    assert "objective.p_mean: unknown key" in msg  # default member is SCT, which has no p_mean
    msg = error(from_dict, Train, {**base, "objective": {"name": "sctt"}})
    assert "objective.name: unknown name 'sctt'; did you mean 'sct'?" in msg and "valid names: ict, sct" in msg


def test_apply_overrides_nested_creation_and_parsing():
    raw = {"model": {"channels": 8}, "lr": 0.1}
    out, keys = apply_overrides(raw, ["lr=1e-4", "model.channels=16", "model.attn_res=[1,2]",
                                      "objective.p_mean=-3e5", "objective.name=ict", "tags.x=1.5E+2"])
    assert raw == {"model": {"channels": 8}, "lr": 0.1}  # input untouched
    assert out["lr"] == 1e-4 and isinstance(out["lr"], float)
    assert out["objective"] == {"p_mean": -3e5, "name": "ict"} and isinstance(out["objective"]["p_mean"], float)
    assert out["model"] == {"channels": 16, "attn_res": [1, 2]}
    assert out["tags"] == {"x": 150.0}
    assert keys == {"lr", "model.channels", "model.attn_res", "objective.p_mean", "objective.name", "tags.x"}


@pytest.mark.parametrize("bad", ["foo", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad):
    assert f"override {bad!r}: malformed" in error(apply_overrides, {}, [bad])


def test_override_into_scalar_and_bad_yaml_value():
    assert "'lr' is float 0.1, not a mapping" in error(apply_overrides, {"lr": 0.1}, ["lr.x=1"])
    assert "override 'a=[1,': a: cannot parse the value" in error(apply_overrides, {}, ["a=[1,"])


def test_override_errors_mention_the_override(tmp_path):
    path = write(tmp_path, "model: {channels: 8}\nobjective: {name: ict}\n")
    msg = error(load, Train, path, ["objective.p_mena=0.5"])
    assert msg.startswith(f"{path}: objective.p_mena: unknown key; did you mean 'p_mean'?")
    assert msg.endswith("(set by override 'objective.p_mena=0.5')")
    msg = error(load, Train, path, ["model.attn_res=[1, x]"])
    assert "model.attn_res[1]: expected int, got str 'x'" in msg and "set by override 'model.attn_res=[1, x]'" in msg
    assert load(Train, path, ["objective.p_mean=1e-4", "lr=-3e5"]).objective.p_mean == 1e-4


def test_check_errors_get_full_dotted_prefix():
    msg = error(from_dict, Holder, {"train": {"model": {"channels": 8, "dropout": 1.5}}}, source="c.yaml")
    assert msg == "c.yaml: train.model.dropout: must be in [0, 1), got 1.5"
    msg = error(from_dict, Holder, {"train": {"model": {"channels": 8}, "use_fp16": True}})
    assert msg.startswith("<dict>: train.objective.name: sCT's JVP is unstable in fp16")
    # the same flag is fine with the other objective
    assert from_dict(Train, {"model": {"channels": 8}, "use_fp16": True, "objective": {"name": "ict"}}).use_fp16


def test_save_yaml_is_atomic(tmp_path):
    path = tmp_path / "config.yaml"
    cfg = from_dict(Train, FULL)
    save_yaml(cfg, path)
    save_yaml(cfg, path)  # overwrite
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert load(Train, path) == cfg
    broken = Train(model=Model(channels=8), tags={"x": object()})  # not YAML-representable
    with pytest.raises(yaml.representer.RepresenterError):
        save_yaml(broken, path)
    assert os.listdir(tmp_path) == ["config.yaml"]  # no temporary file left behind
    assert load(Train, path) == cfg  # old file intact


def test_parse_cli(tmp_path):
    path = write(tmp_path, "model: {channels: 8}\n")
    argv = ["--local_rank=0", "--config", str(path), "model.channels=64", "--dry-run", "lr=3e-4"]
    cfg, args = parse_cli(argv, Train)
    assert args.dry_run and args.local_rank == 0
    assert cfg.model.channels == 64 and cfg.lr == 3e-4
    cfg, args = parse_cli(["--local-rank", "1", "--config", str(path)], Train)
    assert not args.dry_run and cfg == from_dict(Train, {"model": {"channels": 8}})
    assert "override 'oops': malformed" in error(parse_cli, ["--config", str(path), "oops"], Train)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error(load, Train, missing).startswith(f"{missing}: cannot read config file")
    bad = write(tmp_path, "model:\n  channels: 8\n   dropout: [1\n", "bad.yaml")
    msg = error(load, Train, bad)
    assert msg.startswith(f"{bad}: invalid YAML at line") and "\n" not in msg
    listing = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    assert error(load, Train, listing) == f"{listing}: expected a mapping at the top level, got list [1, 2]"
    dup = write(tmp_path, "model: {channels: 8}\nlr: 0.1\nlr: 0.2\n", "dup.yaml")
    assert error(load, Train, dup) == f"{dup}: invalid YAML at line 3, column 1: duplicate key 'lr'"


def test_yaml_file_exponent_floats(tmp_path):
    path = write(tmp_path, "model: {channels: 8, dropout: 5e-2}\nlr: 1e-4\n")
    cfg = load(Train, path)
    assert cfg.lr == 1e-4 and cfg.model.dropout == 0.05


@dataclass
class Misc:
    size: tuple[int, int] = (32, 32)
    seed: int | str = 0
    objective: ICT | SCT | None = None


def test_fixed_tuple_plain_union_and_optional_tagged_union():
    cfg = from_dict(Misc, {"size": [8, 16], "seed": "run-a", "objective": {"name": "ict"}})
    assert cfg == Misc(size=(8, 16), seed="run-a", objective=ICT())
    assert from_dict(Misc, to_dict(cfg)) == cfg
    assert "size: expected 2 items (tuple[int, int]), got 3" in error(from_dict, Misc, {"size": [1, 2, 3]})
    assert "seed: expected int | str, got float 1.5" in error(from_dict, Misc, {"seed": 1.5})
    # no default member to update: the name is required
    assert "objective.name: missing required key (valid names: ict, sct)" in error(from_dict, Misc, {"objective": {}})

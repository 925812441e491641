"""Strict YAML -> typed dataclass config trees: loading, dotted overrides, dumping and the CLI.

Generic: knows no component. Components own their config dataclasses next to their code (DESIGN
rule 5); the top-level tree composes them. Strict (rule 6): unknown keys, wrong types, duplicate
YAML keys and impossible combinations (a dataclass's ``check()``) raise ``ConfigError`` naming the
dotted key and its source (file or override). Tests: ``pytest tests/unit/test_config.py``.

    cfg, args = parse_cli(sys.argv[1:], TrainConfig)  # --config X.yaml [--dry-run] [a.b=1 ...]
    save_yaml(cfg, run_dir / "config.yaml")           # the resolved config; load() reads it back

Field types: dataclasses, bool, int, float (ints accepted; NaN and ±inf rejected), str, Literal[...], X | None, list[X],
tuple[X, ...], tuple[X, Y], dict[str, X], unions. A union of dataclasses is tagged: each member has
``name: Literal["..."] = "..."``; a mapping's ``name`` picks the member, and a mapping without it
updates the field's default. Keys not given keep their defaults.
Presets: a dataclass with a ``preset`` field and a ``PRESETS: ClassVar[dict[str, dict]]`` table fills
the keys a mapping does not give from ``PRESETS[preset]`` (explicit keys win, then the preset, then
the defaults); the dumped config holds every key, so it reloads to the same values.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """``str()`` is ``"{source}: {key}: {message}"``. ``check()`` methods raise it with a key relative
    to their dataclass; ``from_dict`` re-raises it with the full dotted key and the source."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.message, self.source = key, message, source
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(part for part in (self.source, self.key, self.message) if part)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 / -3e5 as floats (YAML 1.1 says str) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load(cls: type[T], path: str | os.PathLike, overrides: Sequence[str] = ()) -> T:
    """Read a YAML file (UTF-8; empty means every key at its default, which ``cls.check()`` must still
    accept), apply ``key=value`` overrides, build ``cls``."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read config file ({e.strerror or e})", source) from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not a UTF-8 text file (byte {e.start}: {e.object[e.start:e.start + 1]!r})", source) from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML{_yaml_problem(e)}", source) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("", f"expected a mapping at the top level, got {_got(raw)}", source)
    raw, overridden = apply_overrides(raw, overrides)
    return from_dict(cls, raw, source=source, overridden=overridden)


def apply_overrides(raw: Mapping, overrides: Sequence[str]) -> tuple[dict, frozenset[str]]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` set (value parsed as YAML; missing
    intermediate mappings created) and the set of dotted keys the overrides set."""
    out, keys = copy.deepcopy(dict(raw)), set()
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        source = f"override {item!r}"
        if not sep or not all(parts):
            raise ConfigError("", "malformed; expected dotted.key=value", source)
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(key, f"cannot parse the value{_yaml_problem(e)}", source) from None
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(key, f"{where!r} is {_got(child)}, not a mapping", source)
            node = child
        node[parts[-1]] = value
        keys.add(".".join(parts))
    return out, frozenset(keys)


def from_dict(cls: type[T], data: Mapping, *, source: str = "<dict>",
              overridden: frozenset[str] = frozenset()) -> T:
    """Build dataclass ``cls`` from plain data, strictly; errors name the key and ``source``."""
    try:
        return _build(cls, data, "", None)
    except ConfigError as e:
        raise ConfigError(e.key, e.message + _override_note(e.key, data, overridden), source) from None


def _build(cls: type, data: Any, key: str, base: Any) -> Any:
    """Build ``cls`` at dotted ``key``; keys missing from ``data`` come from ``base`` if given."""
    if not isinstance(data, Mapping):
        raise ConfigError(key, f"expected a mapping for {cls.__name__}, got {_got(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            valid = ", ".join(fields)
            raise ConfigError(_join(key, str(k)), f"unknown key{_suggest(k, fields)} (valid keys: {valid})")
    presets = getattr(cls, "PRESETS", None)
    if presets is not None and data.get("preset") is not None:
        name = data["preset"]
        if not isinstance(name, str) or name not in presets:
            raise ConfigError(_join(key, "preset"), f"unknown preset {name!r}{_suggest(name, presets)} "
                                                    f"(valid presets: {', '.join(presets)})")
        data = {**presets[name], **data}  # explicit keys override the preset's
    hints, kwargs = typing.get_type_hints(cls), {}
    for name, f in fields.items():
        if name not in data:
            if base is not None:
                kwargs[name] = getattr(base, name)
            elif f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(_join(key, name), "missing required key")
            continue
        default = getattr(base, name) if base is not None else f.default
        if default is _MISSING and f.default_factory is not _MISSING:
            default = f.default_factory()
        kwargs[name] = _convert(hints[name], data[name], _join(key, name), default)
    try:
        obj = cls(**kwargs)
        check = getattr(obj, "check", None)
        if callable(check):
            check()
    except ConfigError as e:
        raise ConfigError(_join(key, e.key), e.message) from None
    return obj


def _convert(tp: Any, value: Any, key: str, default: Any = _MISSING) -> Any:
    """Check ``value`` against type ``tp`` and convert it (lists to tuples, ints to floats, ...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(args, value, key, default)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = _suggest(value, [str(a) for a in args])
        raise ConfigError(key, f"expected one of {', '.join(map(repr, args))}, got {_got(value)}{hint}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, default if isinstance(default, tp) else None)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list ({_name(tp)}), got {_got(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} items ({_name(tp)}), got {len(value)}")
            return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
        return origin(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping ({_name(tp)}), got {_got(value)}")
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise ConfigError(_join(key, str(bad)), f"expected a str key, got {_got(bad)}")
        return {k: _convert(args[1], v, _join(key, k)) for k, v in value.items()}
    if tp is float and type(value) in (int, float):
        if not math.isfinite(value):  # YAML's .nan/.inf would silently switch features off (grad_clip, tangent_norm_c)
            raise ConfigError(key, f"must be a finite number, got {value}")
        return float(value)
    if tp in (bool, int, float, str):
        if type(value) is tp:
            return value
        raise ConfigError(key, f"expected {tp.__name__}, got {_got(value)}")
    raise TypeError(f"sct.config cannot load type {tp!r} (field {key!r})")


def _convert_union(args: tuple, value: Any, key: str, default: Any) -> Any:
    members = [a for a in args if a is not type(None)]
    expected = " | ".join(map(_name, args))
    if value is None:
        if len(members) < len(args):
            return None
        raise ConfigError(key, f"expected {expected}, got null")
    if len(members) == 1:
        return _convert(members[0], value, key, default)
    if all(dataclasses.is_dataclass(m) for m in members):
        return _convert_tagged(members, value, key, default)
    for member in members:
        with contextlib.suppress(ConfigError):
            return _convert(member, value, key, default)
    raise ConfigError(key, f"expected {expected}, got {_got(value)}")


def _convert_tagged(members: list[type], value: Any, key: str, default: Any) -> Any:
    """Pick the union member by the mapping's ``name`` (else the default's type) and build it."""
    tags = {getattr(m, "name", None): m for m in members}
    if not all(isinstance(tag, str) for tag in tags) or len(tags) < len(members):
        raise TypeError(f"every dataclass in {key!r}'s union needs a distinct default 'name'")
    valid = ", ".join(tags)
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping with a 'name' ({valid}), got {_got(value)}")
    if "name" in value:
        name = value["name"]
        if not isinstance(name, str) or name not in tags:
            raise ConfigError(_join(key, "name"),
                              f"unknown name {name!r}{_suggest(name, tags)} (valid names: {valid})")
        cls = tags[name]
    elif isinstance(default, tuple(members)):
        cls = type(default)
    else:
        raise ConfigError(_join(key, "name"), f"missing required key (valid names: {valid})")
    return _build(cls, value, key, default if isinstance(default, cls) else None)


def to_dict(obj: Any) -> dict:
    """Plain YAML-safe dict of a dataclass tree (tuples become lists); ``from_dict`` reads it back."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_dict(obj)
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def save_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write ``to_yaml(obj)`` atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_yaml(obj))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config FILE``, ``--dry-run``, ``--local_rank`` (ignored) and ``key=value ...``."""
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. objective.p_mean=-1.1 optim.lr=1e-4")
    return parser


def parse_cli(argv: Sequence[str], cls: type[T],
              parser: argparse.ArgumentParser | None = None) -> tuple[T, argparse.Namespace]:
    """Parse ``argv`` (options and overrides in any order) and load ``cls``; the caller acts on
    ``args.dry_run``. A token without '=' is a ConfigError. Pass ``parser`` to add your own flags."""
    parser = add_cli_args(parser or argparse.ArgumentParser())
    args = parser.parse_intermixed_args(list(argv))
    return load(cls, args.config, args.overrides), args


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else prefix or key


def _suggest(word: Any, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _got(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    plain = isinstance(tp, type) and typing.get_origin(tp) is None
    return tp.__name__ if plain else repr(tp).replace("typing.", "")


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {problem or ' '.join(str(e).split())}"


def _override_note(key: str, data: Mapping, overridden: frozenset[str]) -> str:
    """' (set by override 'a.b=value')' when ``key`` is, or is under, a key an override set."""
    hits = [o for o in overridden if key == o or key.startswith((o + ".", o + "["))]
    if not hits:
        return ""
    o, value = max(hits, key=len), data
    for part in o.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("...\n").strip()
    return f" (set by override '{o}={text}')"

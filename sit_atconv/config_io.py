"""Config files and command lines: YAML diffs with `base:`, `--section.field` options, saved configs.

Precedence: dataclass defaults <- YAML (`base:` chain) <- command line. Values are coerced to the field's
type; an unknown key names the nearest valid one, a key of an earlier version names its new place.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .config import ARCHITECTURE, SECTIONS, ModelConfig, RunConfig, config_to_dict, nearest, validate
from .errors import ConfigError
from .io import write_text_atomic

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "digits"
ALIASES: dict[str, str] = {
    "--results-dir": "log.results_dir", "--max-steps": "train.max_steps", "--ckpt-every": "log.ckpt_every",
    "--resume": "train.resume", "--seed": "train.seed", "--global-batch-size": "train.global_batch_size",
    "--mixed-precision": "train.mixed_precision", "--data-path": "data.data_path", "--model": "model.name",
    "--mixer": "model.mixer", "--run-name": "log.run_name",
}


# keys of earlier versions -> where they live now (configs and flags name the new place; saved runs migrate)
MOVED: dict[str, str] = {
    **{f"optim.{k}": f"train.{k}" for k in ("global_batch_size", "max_steps", "ema_decay", "mixed_precision",
                                            "compile", "seed")},
    "log.resume": "train.resume",
    "log.sample_every": "log.preview_every",
}


def migrate_saved(data: dict) -> dict:
    """A config saved by an earlier version (checkpoint or config.yaml) in today's layout.

    Moves keys listed in `MOVED`, and turns a zoo name with overridden depth/width/heads (the old way to
    state a custom size) into the explicit architecture it described.
    """
    data = {s: dict(v or {}) for s, v in data.items()}
    for old, new in MOVED.items():
        (s_old, k_old), (s_new, k_new) = old.split("."), new.split(".")
        if k_old in data.get(s_old, {}):
            data.setdefault(s_new, {})[k_new] = data[s_old].pop(k_old)
    model = data.get("model", {})
    if model.get("name") and any(model.get(k) is not None for k in ("depth", "hidden_size", "num_heads")):
        row = ModelConfig(name=model.pop("name")).architecture()
        for key in ARCHITECTURE:
            model[key] = model.get(key) if model.get(key) is not None else row[key]
        model["name"] = None
    return data


def _fields(section: str) -> dict[str, tuple[Any, dataclasses.Field]]:
    """{field name: (resolved type, Field)} of one section."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'model.depth'."""
    return [f"{s}.{n}" for s in SECTIONS for n in _fields(s)]


# ---------------------------------------------------------------------------------------------- values

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NONE = ("none", "null", "")


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (Union, types.UnionType):
        return type_name(next(a for a in args if a is not type(None))) + "|none"
    if origin in (tuple, list):
        return ",".join(type_name(a) for a in args) if origin is tuple else type_name(args[0]) + ",..."
    return tp.__name__.upper()


def _scalar(key: str, value: Any, tp: type, bad) -> Any:
    """bool / int / float / str conversion; `bad(expected)` builds the error."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if isinstance(value, bool) and tp in (int, float, str):
        raise bad({int: "an integer", float: "a number", str: "a string"}[tp])
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return value if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            raise bad("an integer") from None
    if tp is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if tp is str and isinstance(value, (str, int, float)):
        return str(value)
    raise bad("a string") if tp is str else TypeError(f"{key}: unsupported config type {tp}")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value or CLI string to `tp`, or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str, extra: str = "") -> ConfigError:
        return ConfigError(f"{key}: expected {expected}, got {value!r}{extra}")

    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as False
            value = "no"
        if value in args:
            return value
        raise bad("one of " + ", ".join(map(str, args)), nearest(str(value), [str(a) for a in args]))
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [] if value.strip().lower() in _NONE else [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise bad(f"a comma-separated list ({type_name(tp)})")
        if origin is tuple:
            if len(value) != len(args):
                raise bad(f"{len(args)} comma-separated values ({type_name(tp)})")
            return tuple(coerce(key, v, a) for v, a in zip(value, args))
        return [coerce(key, v, args[0]) for v in value]
    return _scalar(key, value, tp, bad)


# ------------------------------------------------------------------------------------- dicts and files

def apply(cfg: RunConfig, key: str, value: Any, where: str) -> None:
    """Set dotted `key` on `cfg` after type conversion; unknown keys name the nearest valid one."""
    if key in MOVED:
        raise ConfigError(f"config key '{key}'{where} has moved to '{MOVED[key]}'; write that instead")
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in _fields(section):
        raise ConfigError(f"unknown config key '{key}'{where}" + nearest(key, all_keys()))
    tp, _ = _fields(section)[name]
    setattr(getattr(cfg, section), name, coerce(key, value, tp))


def apply_dict(cfg: RunConfig, data: dict, where: str) -> None:
    """Apply a nested {section: {field: value}} mapping onto `cfg`."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{where}" + nearest(str(section), list(SECTIONS)))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}'{where} must be a mapping of field: value")
        for name, value in values.items():
            apply(cfg, f"{section}.{name}", value, where)


def config_from_dict(data: dict, saved: bool = True) -> RunConfig:
    """A validated RunConfig from `config_to_dict` output (missing keys take defaults).

    `saved=True` (a run's own record) first migrates keys of earlier versions.
    """
    cfg = RunConfig()
    apply_dict(cfg, migrate_saved(data) if saved else dict(data), "")
    return validate(cfg)


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A YAML path, or a name of a file in configs/ (with or without .yaml)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{path_or_name}' not found (not a file, not in {CONFIG_DIR})"
                      + nearest(name, available) + f" Available: {', '.join(available)}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Nested dict of `path` merged over its `base:` chain (paths relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain ({' -> '.join(p.name for p in seen + (path,))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    if not base_path.is_file():  # also accept a name from configs/
        base_path = resolve_config_path(base)
    merged = _read_yaml(base_path, seen + (path,))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path_or_name: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML (`base:` chain) <- overrides given as 'section.field=value' strings."""
    path = resolve_config_path(path_or_name)
    cfg = RunConfig()
    apply_dict(cfg, _read_yaml(path), f" in {path}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        apply(cfg, key.strip().lstrip("-"), value, " (override)")
    return validate(cfg)


def config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (the run folder's record of what ran)."""
    return write_text_atomic(path, config_yaml(cfg))


# ------------------------------------------------------------------------------------------------ CLI

def add_config_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config, every `--section.field` (one group per section) and the short aliases."""
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"YAML file, or a name in configs/ ({names}) (default: {DEFAULT_CONFIG})")
    defaults = RunConfig()
    inverse = {v: k for k, v in ALIASES.items()}
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip().splitlines()[0]
                                          if cls.__doc__ and not cls.__doc__.startswith(cls.__name__) else None)
        for name, (tp, fld) in _fields(section).items():
            key = f"{section}.{name}"
            default = getattr(getattr(defaults, section), name)
            if isinstance(default, (list, tuple)):
                default = ",".join(map(str, default)) or "none"
            elif default is None:
                default = "none"
            flags = [f"--{key}"] + ([inverse[key]] if key in inverse else [])
            group.add_argument(*flags, dest=key, metavar=type_name(tp), default=argparse.SUPPRESS,
                               help=f"{fld.metadata['help']} (default: {default})".replace("%", "%%"))
    for old in MOVED:  # accepted by the parser so that `apply` can name the new place
        parser.add_argument(f"--{old}", dest=old, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


UNUSED_BY = {"classification": ("model.", "transport.", "repa."), "diffusion": ("classifier.", "augment.")}


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """RunConfig from a namespace parsed with `add_config_options` (config file, then given options).

    An option of a section the run's task does not use (`--mixer` on a classification run) is refused.
    """
    given = {k: v for k, v in vars(ns).items() if "." in k}
    cfg = load_config(ns.config, [f"{k}={v}" for k, v in given.items()])
    unused = [k for k in given if k.startswith(UNUSED_BY[cfg.train.task])]
    if unused:
        raise ConfigError(f"--{unused[0]} has no effect on a {cfg.train.task} run (train.task={cfg.train.task}); "
                          "drop it or pick a config of the other task")
    return cfg

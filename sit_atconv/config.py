"""Typed run configuration: dataclass defaults <- YAML diff (with `base:`) <- command-line overrides.

The dataclass defaults are the paper's ImageNet-256 SiT-XL/2 protocol (SPEC §2); files in `configs/`
state only what they change. Every field is also a `--section.field` option. Problems (unknown keys,
wrong types, out-of-range values) raise one `ConfigError` line naming the key and the nearest valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sit_atconv.io import atomic_write

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "digits"
MODEL_NAME_RE = re.compile(r"^SiT-(S|B|L|XL)/(2|4|8)$")
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2", "euler", "midpoint",
               "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
SDE_METHODS = ("Euler", "Heun")


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message is one line naming the problem and fix."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = _f("SiT-XL/2", "SiT size and patch, SiT-{S,B,L,XL}/{2,4,8}; sets depth/width/heads")
    mixer: Literal["attn", "atconv", "hybrid"] = _f("atconv", "token mixer of the blocks (hybrid alternates)")
    depth: int | None = _f(None, "number of blocks; none = from the name")
    hidden_size: int | None = _f(None, "token width; none = from the name")
    num_heads: int | None = _f(None, "attention heads; none = from the name")
    input_size: int = _f(32, "side of the model input (latent side, or pixels when autoencoder=identity)")
    in_channels: int = _f(4, "channels of the model input (4 for SD-VAE latents)")
    num_classes: int = _f(1000, "class labels; 1 = unconditional")
    learn_sigma: bool = _f(True, "also output a variance head (doubles output channels, as in SiT)")
    class_dropout_prob: float = _f(0.1, "label dropout probability for classifier-free guidance")
    kernel_size: int = _f(3, "ATConv kernel side k (odd)")
    kernel_pool: Literal["sequence", "grid"] = _f("sequence", "ATConv kernel pooling: raster stripes "
                                                  "(reference) or a k x k grid")

    @property
    def size(self) -> str:
        """Size letter(s) of `name`: S, B, L or XL."""
        return MODEL_NAME_RE.match(self.name).group(1)

    @property
    def patch_size(self) -> int:
        """Patch side parsed from `name` (the one place `input_size // patch` is derived from)."""
        return int(MODEL_NAME_RE.match(self.name).group(2))


@dataclass
class TransportConfig:
    path_type: Literal["Linear", "GVP", "VP"] = _f("Linear", "interpolant path (t=0 noise, t=1 data)")
    prediction: Literal["velocity", "score", "noise"] = _f("velocity", "what the network predicts")
    loss_weight: Literal["velocity", "likelihood"] | None = _f(None, "loss weighting; none = uniform")
    train_eps: float | None = _f(None, "time clipping when training; none = SiT's per-path default")
    sample_eps: float | None = _f(None, "time clipping when sampling; none = SiT's per-path default")
    sample_mode: Literal["ode", "sde"] = _f("sde", "sampler for previews/eval")
    sampling_method: str = _f("Euler", f"ode: one of {', '.join(ODE_METHODS)}; sde: Euler or Heun")
    num_steps: int = _f(250, "sampling steps (fixed-step solvers)")
    cfg_scale: float = _f(1.0, "classifier-free guidance scale; 1 = no guidance")


@dataclass
class DataConfig:
    source: Literal["digits", "images", "latents"] = _f("latents", "built-in sklearn digits, an image "
                                                        "folder, or a store from extract_latents")
    data_path: str | None = _f(None, "image folder or latent store (unused for digits)")
    image_size: int = _f(256, "pixel side after the ADM centre crop (digits: upsampled side)")
    autoencoder: str = _f("stabilityai/sd-vae-ft-ema", "'identity' (pixel space), a diffusers "
                          "AutoencoderKL hub id, or a local folder")
    latent_scale: float = _f(0.18215, "multiplier on VAE latents (SD-VAE: 0.18215); identity ignores it")
    random_flip: bool = _f(True, "random horizontal flips (latent stores hold both flips)")
    num_workers: int = _f(4, "DataLoader worker processes per rank")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "AdamW learning rate (reached after warmup)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas, e.g. 0.9,0.999")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float | None = _f(None, "max gradient norm; none = no clipping")
    warmup_steps: int = _f(0, "linear LR warmup steps")
    global_batch_size: int = _f(256, "batch summed over all processes")
    max_steps: int = _f(400_000, "training steps")
    ema_decay: float = _f(0.9999, "EMA decay per step")
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", "Accelerate mixed precision")
    compile: bool = _f(False, "torch.compile the model")
    seed: int = _f(0, "global seed")


@dataclass
class LogConfig:
    results_dir: str = _f("results", "folder that holds run folders")
    run_name: str | None = _f(None, "run folder name; none = derived from the config")
    ckpt_every: int = _f(50_000, "steps between checkpoints")
    keep_last: int = _f(2, "rolling checkpoints kept (0 = all)")
    keep_every: int | None = _f(100_000, "checkpoints at multiples of this are never deleted")
    sample_every: int = _f(10_000, "steps between preview grids (0 = never)")
    log_every: int = _f(100, "steps between metric logs")
    trackers: list[Literal["wandb", "tensorboard"]] = _f([], "experiment trackers, e.g. wandb,tensorboard")
    wandb_project: str = _f("sit_atconv", "wandb project name")
    resume: str = _f("auto", "'auto' (latest checkpoint in the run folder), 'none', or a checkpoint path")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
ALIASES: dict[str, str] = {
    "--results-dir": "log.results_dir", "--max-steps": "optim.max_steps", "--ckpt-every": "log.ckpt_every",
    "--resume": "log.resume", "--seed": "optim.seed", "--global-batch-size": "optim.global_batch_size",
    "--mixed-precision": "optim.mixed_precision", "--data-path": "data.data_path", "--model": "model.name",
    "--mixer": "model.mixer",
}


def _fields(section: str) -> dict[str, tuple[Any, dataclasses.Field]]:
    """{field name: (resolved type, Field)} of one section."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'model.depth'."""
    return [f"{s}.{n}" for s in SECTIONS for n in _fields(s)]


def _nearest(word: str, options: list[str]) -> str:
    """"; did you mean 'X'?" for the closest option, or ''."""
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


# ---------------------------------------------------------------------------------------------- values

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (Union, types.UnionType):
        return _type_name(next(a for a in args if a is not type(None))) + "|none"
    if origin in (tuple, list):
        return ",".join(_type_name(a) for a in args) if origin is tuple else _type_name(args[0]) + ",..."
    return tp.__name__.upper()


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value or CLI string to `tp`, or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str, extra: str = "") -> ConfigError:
        return ConfigError(f"{key}: expected {expected}, got {value!r}{extra}")

    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as False
            value = "no"
        if value in args:
            return value
        raise bad("one of " + ", ".join(map(str, args)), _nearest(str(value), [str(a) for a in args]))
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise bad(f"a comma-separated list ({_type_name(tp)})")
        if origin is tuple:
            if len(value) != len(args):
                raise bad(f"{len(args)} comma-separated values ({_type_name(tp)})")
            return tuple(_coerce(key, v, a) for v, a in zip(value, args))
        return [_coerce(key, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise bad("an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    raise TypeError(f"{key}: unsupported config type {tp}")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


POSITIVE = ("model.depth", "model.hidden_size", "model.num_heads", "model.input_size", "model.in_channels",
            "model.num_classes", "model.kernel_size", "transport.num_steps", "data.image_size",
            "data.latent_scale", "optim.lr", "optim.eps", "optim.grad_clip", "optim.global_batch_size",
            "optim.max_steps", "log.ckpt_every", "log.keep_every", "log.log_every")
NON_NEGATIVE = ("transport.cfg_scale", "data.num_workers", "optim.weight_decay", "optim.warmup_steps",
                "optim.seed", "log.keep_last", "log.sample_every")
UNIT_INTERVAL = ("model.class_dropout_prob", "optim.ema_decay")  # [0, 1)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and consistency checks that types alone cannot express; returns `cfg`."""
    def get(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key in POSITIVE:
        v = get(key)
        _check(v is None or v > 0, f"{key}: must be {'a positive integer' if isinstance(v, int) else '> 0'}, "
                                   f"got {v}")
    for key in NON_NEGATIVE:
        _check(get(key) >= 0, f"{key}: must be >= 0, got {get(key)}")
    for key in UNIT_INTERVAL:
        _check(0.0 <= get(key) < 1.0, f"{key}: must be in [0, 1), got {get(key)}")
    m, t, o, lg = cfg.model, cfg.transport, cfg.optim, cfg.log
    _check(MODEL_NAME_RE.match(m.name) is not None,
           f"model.name: {m.name!r} is not SiT-{{S,B,L,XL}}/{{2,4,8}}"
           + _nearest(m.name, [f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]))
    if m.hidden_size is not None and m.num_heads is not None:
        _check(m.hidden_size % m.num_heads == 0,
               f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    _check(m.input_size % m.patch_size == 0,
           f"model.input_size={m.input_size} is not divisible by the patch size {m.patch_size} of {m.name}")
    _check(m.kernel_size % 2 == 1, f"model.kernel_size: must be odd, got {m.kernel_size}")
    methods = ODE_METHODS if t.sample_mode == "ode" else SDE_METHODS
    _check(t.sampling_method in methods,
           f"transport.sampling_method: {t.sampling_method!r} is not a {t.sample_mode} method "
           f"({', '.join(methods)})" + _nearest(t.sampling_method, list(methods)))
    for key in ("train_eps", "sample_eps"):
        v = getattr(t, key)
        _check(v is None or 0.0 <= v < 0.5, f"transport.{key}: must be in [0, 0.5) or none, got {v}")
    _check(bool(cfg.data.autoencoder.strip()), "data.autoencoder: empty; use identity, a hub id or a folder")
    _check(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas: each must be in [0, 1), got {o.betas}")
    _check(len(set(lg.trackers)) == len(lg.trackers), f"log.trackers: repeated entries in {lg.trackers}")
    _check(bool(lg.resume.strip()), "log.resume: empty; use 'auto', 'none' or a checkpoint path")
    _check(lg.run_name is None or ("/" not in lg.run_name and lg.run_name not in ("", ".", "..")),
           f"log.run_name: {lg.run_name!r} must be a plain folder name")
    return cfg


# ------------------------------------------------------------------------------------- dicts and files

def _apply(cfg: TrainConfig, key: str, value: Any, where: str) -> None:
    """Set dotted `key` on `cfg` after type conversion; unknown keys name the nearest valid one."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in _fields(section):
        raise ConfigError(f"unknown config key '{key}'{where}" + _nearest(key, all_keys()))
    tp, _ = _fields(section)[name]
    setattr(getattr(cfg, section), name, _coerce(key, value, tp))


def _apply_dict(cfg: TrainConfig, data: dict, where: str) -> None:
    """Apply a nested {section: {field: value}} mapping onto `cfg`."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{where}"
                              + _nearest(str(section), list(SECTIONS)))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}'{where} must be a mapping of field: value")
        for name, value in values.items():
            _apply(cfg, f"{section}.{name}", value, where)


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict (lists, not tuples) suitable for YAML/JSON and checkpoints."""
    out = dataclasses.asdict(cfg)
    return {s: {k: list(v) if isinstance(v, tuple) else v for k, v in vals.items()}
            for s, vals in out.items()}


def config_from_dict(data: dict) -> TrainConfig:
    """Rebuild a validated TrainConfig from `config_to_dict` output (missing keys take defaults)."""
    cfg = TrainConfig()
    _apply_dict(cfg, dict(data), "")
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
                      + _nearest(name, available) + f" Available: {', '.join(available)}")


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


def load_config(path_or_name: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML (`base:` chain) <- overrides given as 'section.field=value' strings."""
    path = resolve_config_path(path_or_name)
    cfg = TrainConfig()
    _apply_dict(cfg, _read_yaml(path), f" in {path}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        _apply(cfg, key.strip().lstrip("-"), value, " (override)")
    return validate(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (the run folder's record of what ran)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ------------------------------------------------------------------------------------------------ CLI

class CLIParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: 'error: ...', exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Parser with --config, every `--section.field`, and the short aliases; callers may add more."""
    parser = CLIParser(description=description or __doc__.splitlines()[0], allow_abbrev=False)
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"YAML file, or a name in configs/ ({names}) (default: {DEFAULT_CONFIG})")
    defaults = TrainConfig()
    inverse = {v: k for k, v in ALIASES.items()}
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        for name, (tp, fld) in _fields(section).items():
            key = f"{section}.{name}"
            default = getattr(getattr(defaults, section), name)
            if isinstance(default, (list, tuple)):
                default = ",".join(map(str, default)) or "none"
            elif default is None:
                default = "none"
            flags = [f"--{key}"] + ([inverse[key]] if key in inverse else [])
            group.add_argument(*flags, dest=key, metavar=_type_name(tp), default=argparse.SUPPRESS,
                               help=f"{fld.metadata['help']} (default: {default})".replace("%", "%%"))
    return parser


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """TrainConfig from a namespace made by `build_parser()` (config file, then given options)."""
    given = [f"{k}={v}" for k, v in vars(ns).items() if "." in k]
    return load_config(ns.config, given)


def parse_args(argv: list[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse the command line into (config, namespace); print 'error: ...' and exit 2 on any problem."""
    parser = parser or build_parser()
    ns, unknown = parser.parse_known_args(argv)
    try:
        if unknown:
            word = unknown[0]
            flags = [o for a in parser._actions for o in a.option_strings]
            hint = _nearest(word.split("=")[0], flags) if word.startswith("-") else ""
            raise ConfigError(f"unknown option '{word}'" + hint if word.startswith("-")
                              else f"unexpected argument '{word}'")
        return config_from_args(ns), ns
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

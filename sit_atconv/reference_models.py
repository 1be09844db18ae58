"""Checkpoints of the authors' two SiT forks -> our models, speaking our time convention.

The reference repository has two SiTs with the same parameter names but different facts (SPEC §2):

| fact                | SiT fork (`generation/SiT`)       | REPA fork (`generation/REPA`)                         |
|---------------------|-----------------------------------|-------------------------------------------------------|
| ATConv blocks       | `token_mixer` / `hybrid`          | only if `hybrid`: plain "-ATConv" models are attention |
| kernel nonlinearity | tanh-GELU                         | SiLU                                                  |
| ATConv projections  | Linear                            | 1x1 Conv2d (flattened to Linear here)                 |
| position embedding  | with attention blocks             | always                                                |
| output              | 2C with learned sigma (dropped)   | C                                                     |
| attention           | plain                             | optional QK-norm                                      |
| time                | ours: t = 0 noise, v toward data  | t = 0 data, target eps - x (`ReversedTime`)           |
| extra modules       | -                                 | REPA projectors (dropped: sampling does not use them) |

`read_reference` reads a plain state dict or a fork's `{"model", "ema", "args", ...}` file (DDP / compile
prefixes stripped, the forks' argparse arguments allowed in the pickle); `build_reference` infers the
architecture from keys and shapes, takes what shapes cannot tell from the fork it detects, and builds our
SiT. Both forks' ATConv views the tokens on a fixed 16 x 16 grid; a reference model runs only when that is
its token grid, so building ours on the real grid changes nothing numerically.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_tensors, safetensors_metadata, torch_load_safe
from .config import DataConfig, ModelConfig, RunConfig, TransportConfig
from .data.encoders import SD_VAE_ID, SD_VAE_SCALE
from .errors import CheckpointError, ConfigError
from .models.sit import SIT_SIZES, SiT, mixer_pattern
from .models.time_reversed import ReversedTime

FORKS = {"sit": "SiT fork", "repa": "REPA fork"}
METADATA_KEY = "sit_atconv_reference"  # .safetensors header entry: what a converted file was built as
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ATCONV_PROJ = re.compile(r"^blocks\.\d+\.attn\.(kernel_proj|x_proj|proj)\.weight$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_DROPPED_PREFIXES = ("projectors.",)
_REQUIRED = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
_REPA_ARGS = ("proj_coeff", "enc_type", "encoder_depth")  # training arguments only the REPA fork has
_REPA_PATHS = {"linear": "Linear", "cosine": "GVP"}  # its path in its time -> ours (see ReversedTime)
_ASSUMED_INPUT = 32  # 256-px images through the SD-VAE: both forks' default (their ATConv's 16 x 16 grid)
_VAE_DOWNSAMPLE = 8


def strip_prefixes(key: str) -> str:
    """'module._orig_mod.blocks.0...' -> 'blocks.0...' (DDP and torch.compile wrappers)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def from_reference(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a reference (SiT-ATConv or AttNet) state dict to our names; identity where names match.

    Strips wrapper prefixes, drops REPA's alignment projectors, flattens the REPA fork's 1x1-Conv2d
    ATConv projections inside SiT blocks into Linear weights.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = strip_prefixes(key)
        if key.startswith(_DROPPED_PREFIXES):
            continue
        if _ATCONV_PROJ.match(key) and value.dim() == 4 and value.shape[-2:] == (1, 1):
            value = value.flatten(1)
        out[key] = value
    return out


@dataclass
class ReferenceFile:
    """A reference checkpoint as read: its tensors (prefixes stripped), training arguments, provenance."""

    tensors: dict[str, Tensor]
    args: dict[str, Any]   # the fork's argparse arguments, or the record of a converted file, or {}
    label: str             # the file name, or "state dict"
    container: str         # "ema", "model", ... or "state dict"
    step: int

    @property
    def is_sit(self) -> bool:
        return all(k in self.tensors for k in _REQUIRED)


def _unwrap(obj: Mapping, use_ema: bool) -> tuple[Mapping, str, dict[str, Any], int | None]:
    """(tensor dict, its container key, training args, step) of a plain state dict or a fork's file."""
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    step = obj.get("steps", obj.get("step"))
    for key in ("ema", "model") if use_ema else ("model", "ema"):
        if isinstance(obj.get(key), Mapping):
            return obj[key], key, args, step if isinstance(step, int) else None
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key], key, args, None
    return obj, "state dict", args, None


def read_reference(source: str | os.PathLike | Mapping[str, Any], use_ema: bool = True) -> ReferenceFile:
    """Read a reference checkpoint: a path (.safetensors, .pt/.pth) or an in-memory dict. EMA weights first
    (`use_ema=False`: the raw 'model' weights). Pickles load with weights_only; the forks' argparse
    Namespace of training arguments is the one class allowed beyond tensors and containers."""
    recorded: dict[str, Any] = {}
    if isinstance(source, Mapping):
        obj, label, path = source, "state dict", None
    else:
        path = Path(source)
        label = path.name
        if path.suffix == ".safetensors":
            obj = load_tensors(path)
            recorded = json.loads(safetensors_metadata(path).get(METADATA_KEY, "{}"))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch_load_safe(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: expected a state dict (or one under 'ema'/'model'), got {type(obj).__name__}.")
    if "config" in obj and "step" in obj:
        raise CheckpointError(f"{label}: a sit_atconv training checkpoint, not a reference one; load it with "
                              "sit_atconv.build.load_run (or sample.py / eval_fid.py --ckpt).")
    tensors, container, args, step = _unwrap(obj, use_ema)
    tensors = {strip_prefixes(k): v for k, v in tensors.items() if isinstance(v, Tensor)}
    if step is None:
        step = recorded.get("step") or (int(path.stem) if path is not None and path.stem.isdigit() else 0)
    return ReferenceFile(tensors, recorded or args, label, container, int(step))


def detect_fork(ref: ReferenceFile) -> tuple[str, str]:
    """(fork, the evidence): from a converted file's record, the training arguments, or the keys."""
    state, args = ref.tensors, ref.args
    if args.get("fork") in FORKS:
        return args["fork"], "recorded at conversion"
    if args:
        return ("repa" if any(k in args for k in _REPA_ARGS) else "sit"), "training arguments"
    if any(k.startswith("projectors.") for k in state):
        return "repa", "REPA projectors"
    if any(".attn.q_norm." in k for k in state):
        return "repa", "QK-norm"
    if any(_ATCONV_PROJ.match(k) and v.dim() == 4 for k, v in state.items()):
        return "repa", "1x1-conv ATConv projections"
    return "sit", "no REPA projectors, QK-norm or conv projections"


def _fork_facts(fork: str, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the keys cannot tell: the kernel nonlinearity and where the position embedding is added."""
    if fork == "repa":
        return {"kernel_act": "silu", "pos_embed": True}
    return {"kernel_act": "gelu_tanh", "pos_embed": "pos_embed" in state}


def _num_heads(state: Mapping[str, Tensor], hidden: int, mixers: list[str]) -> int | None:
    """From QK-norm's head width, else the size table's row of this width (None: unknown)."""
    if "attn" not in mixers:
        return 1  # no attention: heads are unused
    q_norm = next((v for k, v in state.items() if k.endswith(".attn.q_norm.weight")), None)
    if q_norm is not None:
        return hidden // q_norm.shape[0]
    return next((row.num_heads for row in SIT_SIZES.values() if row.hidden_size == hidden), None)


def _input_size(ref: ReferenceFile, patch: int, notes: list[str]) -> int:
    """From the position embedding's token count, else the training image side, else assumed."""
    pos = ref.tensors.get("pos_embed")
    if pos is not None:
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise CheckpointError(f"{ref.label}: pos_embed has {pos.shape[1]} tokens, not a square grid.")
        return side * patch
    pixels = ref.args.get("image_size") or ref.args.get("resolution")  # SiT fork / REPA fork
    if pixels:
        return int(pixels) // _VAE_DOWNSAMPLE
    notes.append(f"input side {_ASSUMED_INPUT} assumed (pass input_size= otherwise)")
    return _ASSUMED_INPUT


def _classes(ref: ReferenceFile) -> dict[str, Any]:
    """num_classes and whether the label table has the null (guidance) row."""
    rows = ref.tensors["y_embedder.embedding_table.weight"].shape[0]
    given = ref.args.get("num_classes")
    if given is not None:
        n = int(given)
        if rows not in (n, n + 1):
            raise CheckpointError(f"{ref.label}: the label table has {rows} rows but training used {n} classes.")
    else:  # 1000 rows: ImageNet without a null row (the SiT fork trains with class_dropout_rate 0 by default)
        n = rows if rows == 1000 else rows - 1
    return {"num_classes": n, "class_dropout_prob": 0.1 if rows > n else 0.0}


def infer_sit_kwargs(ref: ReferenceFile, fork: str, notes: list[str]) -> dict[str, Any]:
    """Our SiT's constructor arguments for a reference state dict: shapes first, then args and the fork."""
    state = ref.tensors
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{ref.label}: no SiT blocks (blocks.N.*) in the checkpoint.")
    mixers = ["atconv" if f"blocks.{i}.attn.kernel_gen.weight" in state else "attn" for i in range(depth)]
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{ref.label}: {out_channels} output channels for {in_channels} input channels; "
                              "expected the same (no learned sigma) or twice as many.")
    kernel_size = math.isqrt(state[f"blocks.{mixers.index('atconv')}.attn.kernel_gen.weight"].shape[0]) \
        if "atconv" in mixers else 3
    return {"depth": depth, "hidden_size": hidden, "patch_size": patch, "in_channels": in_channels,
            "num_heads": _num_heads(state, hidden, mixers), "input_size": _input_size(ref, patch, notes),
            "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, "mixer": mixers,
            "learn_sigma": out_channels == 2 * in_channels, "kernel_size": kernel_size,
            "qk_norm": any(k.endswith(".attn.q_norm.weight") for k in state), **_classes(ref),
            **_fork_facts(fork, state)}


def _load_into(model: SiT, tensors: dict[str, Tensor], label: str) -> None:
    """Load strictly, with one line naming the first key that does not fit. The frozen sin-cos position
    embedding (never trained by either fork) is taken from our own init when the file lacks it."""
    own = model.state_dict()
    if "pos_embed" in own and "pos_embed" not in tensors:
        tensors["pos_embed"] = own["pos_embed"]
    problems = [f"missing {k}" for k in own if k not in tensors] + \
               [f"unexpected {k}" for k in tensors if k not in own] + \
               [f"{k} is {tuple(tensors[k].shape)}, not {tuple(v.shape)}" for k, v in own.items()
                if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{label}: does not fit the SiT inferred from it ({problems[0]}); pass overrides "
                              "that match the checkpoint (e.g. num_heads=, input_size=).")
    model.load_state_dict(tensors, strict=True)


@dataclass
class ReferenceModel:
    """A reference checkpoint built as our model, with what sampling it needs."""

    model: nn.Module            # model(x, t, y) in our convention (t = 0 noise, velocity toward data)
    network: SiT                # the SiT inside (its weights are the checkpoint's)
    fork: str                   # "sit" or "repa"
    sit_kwargs: dict[str, Any]  # the SiT's constructor arguments
    name: str | None            # the checkpoint's own model name (training args or file name)
    path_type: str              # our transport path (time mapped)
    prediction: str
    step: int
    summary: str = field(default="")

    def record(self) -> dict[str, Any]:
        """What a converted .safetensors file stores so it rebuilds as this model."""
        return {"fork": self.fork, "name": self.name, "path_type": self.path_type, "prediction": self.prediction,
                "step": self.step, "sit": self.sit_kwargs}


def _transport(args: Mapping[str, Any], fork: str) -> tuple[str, str]:
    """(path, prediction) in our vocabulary: recorded, from the training arguments, or Linear/velocity."""
    if "fork" in args:
        return args.get("path_type", "Linear"), args.get("prediction", "velocity")
    if fork == "repa":
        path = args.get("path_type", "linear")
        if path not in _REPA_PATHS:
            raise CheckpointError(f"REPA path_type {path!r} has no counterpart here; known: {sorted(_REPA_PATHS)}.")
        return _REPA_PATHS[path], "velocity"
    return args.get("path_type", "Linear"), args.get("prediction", "velocity")


def build_reference(ref: ReferenceFile, fork: str | None = None, **overrides: Any) -> ReferenceModel:
    """Our model for a read reference checkpoint. `fork` ('sit' | 'repa') overrides the detected fork;
    other keyword arguments override the inferred SiT arguments (input_size, num_heads, num_classes, ...)."""
    if not ref.is_sit:
        raise CheckpointError(f"{ref.label}: not a SiT checkpoint (no {', '.join(_REQUIRED)}).")
    detected, evidence = detect_fork(ref)
    if fork is not None and fork not in FORKS:
        raise ConfigError(f"fork={fork!r} is not a reference fork; use one of {sorted(FORKS)}.")
    fork, evidence = (fork, "as given") if fork else (detected, evidence)
    notes: list[str] = []
    kwargs = dict(ref.args["sit"]) if "sit" in ref.args else infer_sit_kwargs(ref, fork, notes)
    if fork != detected:
        kwargs.update(_fork_facts(fork, ref.tensors))
    unknown = sorted(set(overrides) - set(inspect.signature(SiT).parameters))
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a SiT argument; pass e.g. input_size=, num_heads=, num_classes=.")
    kwargs.update(overrides)
    if kwargs["num_heads"] is None:
        raise CheckpointError(f"{ref.label}: the attention heads of width {kwargs['hidden_size']} are not in the "
                              "size table and have no QK-norm to tell them; pass num_heads=.")
    try:
        network = SiT(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"{ref.label}: cannot build the SiT it describes ({err})") from None
    _load_into(network, from_reference(ref.tensors), ref.label)
    model = ReversedTime(network) if fork == "repa" else network
    name = ref.args.get("model") or ref.args.get("name") or (Path(ref.label).stem if "sit" in ref.label.lower()
                                                             else None)
    out = ReferenceModel(model.eval(), network, fork, kwargs, name, *_transport(ref.args, fork), ref.step)
    out.summary = describe(out, ref, evidence, notes)
    return out


def _name_mismatch(name: str | None, mixers: list[str]) -> str:
    """Where the checkpoint's own name promises other mixers than its blocks hold ('' if it does not)."""
    if not name:
        return ""
    lower, n_atconv = name.lower(), mixers.count("atconv")
    if "atconv" in lower and n_atconv == 0:
        return f"named {name!r} but every block is attention (the REPA fork gives ATConv only to -Hybrid models)"
    if "hybrid" in lower and n_atconv in (0, len(mixers)):
        return f"named {name!r} but not hybrid"
    if "atconv" not in lower and "hybrid" not in lower and n_atconv:
        return f"named {name!r} but {n_atconv} of {len(mixers)} blocks are ATConv"
    return ""


def describe(ref_model: ReferenceModel, ref: ReferenceFile, evidence: str, notes: list[str]) -> str:
    """One line: what was built from which fork, and where it differs from the checkpoint's name."""
    k = ref_model.sit_kwargs
    mixers = mixer_pattern(k["mixer"], k["depth"])
    n_atconv = mixers.count("atconv")
    blocks = ("all attention" if n_atconv == 0 else "all ATConv" if n_atconv == len(mixers) else
              "hybrid (ATConv in every 2nd block)" if mixers == mixer_pattern("hybrid", len(mixers)) else
              f"{n_atconv} ATConv + {len(mixers) - n_atconv} attention blocks")
    net = ref_model.network
    parts = [f"SiT depth {k['depth']}, width {k['hidden_size']}, patch {k['patch_size']}"
             + (f", {k['num_heads']} heads" if n_atconv < len(mixers) else ""),
             f"input {k['in_channels']}x{k['input_size']}x{k['input_size']}", blocks]
    parts += [f"{k.get('kernel_act', 'gelu_tanh')} kernels"] if n_atconv else []
    parts += ["QK-norm"] if k.get("qk_norm") else []
    parts += ["learned sigma (dropped)" if k["learn_sigma"] else "no learned sigma",
              "position embedding" if net.use_pos_embed else "no position embedding",
              f"{k['num_classes']} classes" + (" + null label" if k["class_dropout_prob"] > 0 else
                                                ", no null label (no guidance)")]
    time = ("time reversed to ours (t = 0 noise, velocity toward data), " if ref_model.fork == "repa" else "")
    line = (f"{ref.label} [{ref.container}]: {FORKS[ref_model.fork]} ({evidence}) -> {', '.join(parts)}; "
            f"{time}{ref_model.path_type} path, {ref_model.prediction}")
    extra = notes + [m for m in [_name_mismatch(ref_model.name, mixers)] if m]
    return line + "".join(f"; NB: {n}" for n in extra)


def load_reference(source: str | os.PathLike | Mapping[str, Any], *, fork: str | None = None, use_ema: bool = True,
                   **overrides: Any) -> ReferenceModel:
    """`build_reference(read_reference(source))`: a reference checkpoint of either fork as our model."""
    return build_reference(read_reference(source, use_ema), fork, **overrides)


def model_from_reference(source: str | os.PathLike | Mapping[str, Any], *, fork: str | None = None,
                         use_ema: bool = True, log=print, **overrides: Any) -> nn.Module:
    """A checkpoint of the SiT or REPA fork (file or state dict) -> our model(x, t, y) in eval mode, in our
    convention (t = 0 noise, velocity toward data); prints one line saying what it built."""
    built = load_reference(source, fork=fork, use_ema=use_ema, **overrides)
    log(built.summary)
    return built.model


def reference_tensors(built: ReferenceModel) -> dict[str, Tensor]:
    """Our state dict of the SiT inside (what a converted file stores), contiguous on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in built.network.state_dict().items()}


def reference_run_config(built: ReferenceModel) -> RunConfig:
    """The run config sampling a reference model needs: its architecture (informational: the model is built
    by `build_reference`), its transport (default Linear / velocity), and the autoencoder for its channels
    (SD-VAE for 4-channel latents, pixels for 3, digits for 1)."""
    k = built.sit_kwargs
    mixers = mixer_pattern(k["mixer"], k["depth"])
    mixer = next((m for m in ("attn", "atconv", "hybrid") if mixer_pattern(m, len(mixers)) == mixers), "hybrid")
    model = ModelConfig(name=None, mixer=mixer, depth=k["depth"], hidden_size=k["hidden_size"],
                        patch_size=k["patch_size"], num_heads=k["num_heads"], input_size=k["input_size"],
                        in_channels=k["in_channels"], num_classes=k["num_classes"], learn_sigma=k["learn_sigma"],
                        class_dropout_prob=k["class_dropout_prob"], kernel_size=k["kernel_size"],
                        kernel_act=k.get("kernel_act", "gelu_tanh"))
    channels, side = k["in_channels"], k["input_size"]
    if channels == 4:
        data = DataConfig(source="images", image_size=side * _VAE_DOWNSAMPLE, autoencoder=SD_VAE_ID,
                          latent_scale=SD_VAE_SCALE)
    elif channels in (1, 3):
        data = DataConfig(source="digits" if channels == 1 else "images", image_size=side, autoencoder="identity")
    else:
        raise CheckpointError(f"a {channels}-channel reference model has no autoencoder here (4: SD-VAE latents, "
                              "3: RGB pixels, 1: digits).")
    transport = TransportConfig(path_type=built.path_type, prediction=built.prediction)
    return RunConfig(model=model, transport=transport, data=data)

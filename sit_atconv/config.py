"""Typed run configuration: one dataclass per concern, defaults = the paper's protocol (SPEC §2).

Sections: `model` (the network), `transport` (interpolant, training-time distribution, default
sampler), `repa` (representation alignment), `classifier` and `augment` (AttNet runs), `data` (source,
autoencoder, latent normalisation), `optim` (optimizer and schedule only), `train` (batch, steps, EMA
and post-hoc EMA, precision, compile, seed, resume, guards) and `log` (run folder, checkpoints,
previews, trackers). Files in `configs/` are short
YAML diffs over these defaults (`base:` inherits); every field is also a `--section.field` option
(`sit_atconv.config_io`). Problems raise one `ConfigError` line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import signal
from dataclasses import dataclass, field
from typing import Any, Literal

from .data.encoders import LATENT_NORMS, SD_VAE_ID, SD_VAE_SCALE
from .errors import ConfigError
from .layers.atconv import KernelAct, KernelPool
from .models.attnet import ATTNET_VARIANTS
from .models.sit import MIXERS, PATCH_SIZES, SIT_SIZES, list_sit_models
from .posthoc_ema import MAX_SIGMA_REL
from .transport import LOSS_WEIGHTS, ODE_METHODS, PATHS, PREDICTIONS, SDE_METHODS, TIME_SAMPLINGS

# the choices of a field come from the code that implements them (one list each)
Mixer = Literal[MIXERS]
PathType = Literal[tuple(PATHS)]
Prediction = Literal[PREDICTIONS]
LossWeight = Literal[tuple(w for w in LOSS_WEIGHTS if w is not None)]
TimeSamplingKind = Literal[TIME_SAMPLINGS]

ARCHITECTURE = ("depth", "hidden_size", "patch_size", "num_heads")
CLASSIFIER_ARCHITECTURE = ("depths", "dims", "exp_rates", "glu_norm", "layer_scale")
ATTNET_NAMES = tuple(f"attnet_{v}" for v in ATTNET_VARIANTS)


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The SiT: a zoo name, or an explicit architecture (name none + depth, hidden_size, patch_size, heads)."""

    name: str | None = _f("SiT-XL/2", "zoo size SiT-{S,B,L,XL}/{2,4,8}; none = the explicit architecture "
                          "below")
    mixer: Mixer = _f("atconv", "token mixer of the blocks (hybrid alternates)")
    depth: int | None = _f(None, "blocks (explicit architecture only)")
    hidden_size: int | None = _f(None, "token width (explicit architecture only)")
    patch_size: int | None = _f(None, "patch side (explicit architecture only)")
    num_heads: int | None = _f(None, "attention heads (explicit architecture only)")
    input_size: int = _f(32, "side of the model input (latent side, or pixels when autoencoder=identity)")
    in_channels: int = _f(4, "channels of the model input (4 for SD-VAE latents)")
    num_classes: int = _f(1000, "class labels; 1 = unconditional")
    learn_sigma: bool = _f(True, "also output a variance head (doubles output channels, as in SiT)")
    class_dropout_prob: float = _f(0.1, "label dropout probability for classifier-free guidance")
    kernel_size: int = _f(3, "ATConv kernel side k (odd)")
    kernel_pool: KernelPool = _f("sequence", "ATConv kernel pooling: raster stripes "
                                                  "(reference) or a k x k grid")
    kernel_act: KernelAct = _f("gelu_tanh", "ATConv kernel nonlinearity: gelu_tanh (SiT fork) or silu (REPA fork)")

    def architecture(self) -> dict[str, int]:
        """{depth, hidden_size, patch_size, num_heads}: the zoo row of `name`, or the explicit fields."""
        if self.name is None:
            return {k: getattr(self, k) for k in ARCHITECTURE}
        size, patch = self.name[len("SiT-"):].split("/")
        row = SIT_SIZES[size]
        return {"depth": row.depth, "hidden_size": row.hidden_size, "patch_size": int(patch),
                "num_heads": row.num_heads}

    def tag(self) -> str:
        """Short architecture label for run-folder names and summaries: 'SiT-XL_2' or 'SiT-d4w64p2'."""
        if self.name is not None:
            return self.name.replace("/", "_")
        a = self.architecture()
        return f"SiT-d{a['depth']}w{a['hidden_size']}p{a['patch_size']}"


@dataclass
class ClassifierConfig:
    """The AttNet of a classification run: a zoo name, or an explicit architecture (name none)."""

    name: str | None = _f("attnet_t2", f"AttNet variant ({', '.join(ATTNET_NAMES)}); none = the explicit "
                          "architecture below")
    depths: list[int] | None = _f(None, "blocks per stage (explicit architecture only)")
    dims: list[int] | None = _f(None, "channels per stage (explicit architecture only)")
    exp_rates: list[float] | None = _f(None, "GLU expansion per stage (explicit architecture only)")
    glu_norm: bool | None = _f(None, "RMSNorm inside the GLU (explicit architecture only)")
    layer_scale: bool | None = _f(None, "LayerScale on the residuals (explicit architecture only)")
    in_chans: int = _f(3, "input channels")
    num_classes: int = _f(1000, "classes")
    input_size: int = _f(224, "training image side (evaluation resizes by crop_pct, as timm does)")
    drop_path: float = _f(0.0, "stochastic depth rate (linearly increasing over blocks)")

    def architecture(self) -> dict:
        """AttNet constructor arguments of the zoo row or the explicit fields."""
        if self.name is not None:
            v = ATTNET_VARIANTS[self.name[len("attnet_"):]]
            return {"depths": v.depths, "dims": v.dims, "exp_rates": v.exp_rates, "glu_norm": v.glu_norm,
                    "layer_scale": v.layer_scale}
        return {k: tuple(getattr(self, k)) if isinstance(getattr(self, k), list) else getattr(self, k)
                for k in CLASSIFIER_ARCHITECTURE}

    def tag(self) -> str:
        return self.name or f"attnet-{'x'.join(map(str, self.depths))}-{'x'.join(map(str, self.dims))}"


@dataclass
class AugmentConfig:
    """Classification inputs: timm's augmentation and regularisation (DeiT-style recipe)."""

    rand_augment: str | None = _f(None, "RandAugment policy, e.g. rand-m9-mstd0.5-inc1; none = off")
    color_jitter: float = _f(0.0, "colour jitter strength (0 = off)")
    random_erase: float = _f(0.0, "random-erasing probability")
    mixup: float = _f(0.0, "mixup alpha (0 = off)")
    cutmix: float = _f(0.0, "cutmix alpha (0 = off)")
    label_smoothing: float = _f(0.0, "label smoothing")
    shift: int = _f(0, "random translation by up to this many pixels (tensor data such as digits)")
    repeats: int = _f(1, "repeated augmentation: each image this many times in a row per epoch (DeiT: 3)")


@dataclass
class TransportConfig:
    path_type: PathType = _f("Linear", "interpolant path (t=0 noise, t=1 data)")
    prediction: Prediction = _f("velocity", "what the network predicts")
    loss_weight: LossWeight | None = _f(None, "loss weighting; none = uniform")
    train_eps: float | None = _f(None, "time clipping when training; none = SiT's per-path default")
    sample_eps: float | None = _f(None, "time clipping when sampling; none = SiT's per-path default")
    sample_mode: Literal["ode", "sde"] = _f("sde", "sampler for previews/eval")
    sampling_method: str = _f("Euler", f"ode: one of {', '.join(ODE_METHODS)}; sde: {' or '.join(SDE_METHODS)}")
    num_steps: int = _f(250, "sampling steps (fixed-step solvers)")
    cfg_scale: float = _f(1.0, "classifier-free guidance scale; 1 = no guidance")
    time_sampling: TimeSamplingKind = _f("uniform", "training t distribution (t=0 noise, t=1 data): uniform "
                                          "(SiT) or logit_normal (SD3, LightningDiT, RAE)")
    time_mean: float = _f(0.0, "logit_normal: mean of logit(t); a t=1-noise paper's (SD3) mean m is -m here")
    time_std: float = _f(1.0, "logit_normal: std of logit(t), > 0")
    time_shift: float = _f(1.0, "t -> shift*t/(1+(shift-1)*t) after the draw; 1 = none, < 1 = more noise; "
                                "SD3/RAE shift s is 1/s here")


@dataclass
class RepaConfig:
    """REPA (Yu et al. 2025): align the tokens of one block with a frozen vision encoder's patch tokens."""

    coeff: float = _f(0.0, "weight of the alignment loss (reference: 0.5); 0 = REPA off")
    depth: int = _f(8, "align the tokens after this block (1-based; reference: 8)")
    encoder: str = _f("vit_base_patch14_dinov2.lvd142m", "timm name of the frozen vision encoder")
    encoder_weights: str | None = _f(None, "local weights of the encoder (timm or official DINOv2 file), or "
                                     "'random' (tests); none = the features stored in the latent store")
    encoder_resolution: int | None = _f(None, "encoder input side; none = the side whose patch grid matches "
                                        "the model's token grid")
    encoder_dim: int | None = _f(None, "encoder width; none = read from the encoder or the store (recorded "
                                 "in the run)")
    projector_dim: int = _f(2048, "hidden width of the projector MLP")


@dataclass
class DataConfig:
    source: Literal["digits", "images", "latents"] = _f("latents", "sklearn digits, an image folder, or a latent store")
    data_path: str | None = _f(None, "image folder or latent store (unused for digits)")
    image_size: int = _f(256, "pixel side after the ADM centre crop (digits: upsampled side)")
    autoencoder: str | None = _f(None, f"'identity' (pixel space), a diffusers AutoencoderKL hub id or folder; none "
                                 f"= the latent store's own (latents), identity (digits), else {SD_VAE_ID}")
    latent_scale: float | None = _f(None, f"multiplier on VAE latents; none = the store's own, else {SD_VAE_SCALE}")
    latent_norm: Literal[LATENT_NORMS] = _f("scale", "scale: the model sees latent_scale x z; channel: then (that - "
                                            "mean_c) / std_c per channel (LightningDiT)")
    latent_mean: list[float] | None = _f(None, "latent_norm channel: per-channel mean; none = the store's (saved)")
    latent_std: list[float] | None = _f(None, "latent_norm channel: per-channel std; none = the store's (saved)")
    random_flip: bool = _f(True, "random horizontal flips (latent stores hold both flips)")
    num_workers: int = _f(4, "DataLoader worker processes per rank")


@dataclass
class OptimConfig:
    """The optimizer and its schedule."""

    lr: float = _f(1e-4, "AdamW learning rate (reached after warmup)")
    lr_reference_batch: int | None = _f(None, "scale lr linearly: lr x global_batch_size / this; none = as given")
    weight_decay: float = _f(0.0, "AdamW weight decay (never on biases, norms, difference_control)")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas, e.g. 0.9,0.999")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float | None = _f(None, "max gradient norm; none = no clipping")
    warmup_steps: int = _f(0, "linear LR warmup steps")
    warmup_lr: float = _f(0.0, "learning rate the warmup starts from (0: the first step uses lr / warmup_steps)")
    schedule: Literal["constant", "cosine"] = _f("constant", "after warmup: constant (SiT) or cosine to min_lr")
    min_lr: float = _f(0.0, "final learning rate of the cosine schedule")


@dataclass
class TrainConfig:
    """How long and how: batch, steps, EMA, precision, compile, seed, resume."""

    task: Literal["diffusion", "classification"] = _f("diffusion", "what the run trains: the SiT (model, "
                                                       "transport) or the AttNet (classifier, augment)")
    global_batch_size: int = _f(256, "batch summed over all processes")
    max_steps: int = _f(400_000, "training steps")
    ema_decay: float = _f(0.9999, "EMA decay per step")
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", "Accelerate mixed precision")
    compile: bool = _f(False, "torch.compile the model")
    seed: int = _f(0, "global seed")
    resume: str = _f("auto", "'auto' (latest checkpoint in the run folder), 'none', or a checkpoint path")
    max_bad_steps: int = _f(3, "non-finite steps in a row that are skipped (no update, no EMA) before the run "
                            "stops; 0 = stop at the first")
    nonfinite_check: Literal["auto", "step", "device"] = _f("auto", "where the non-finite guard acts: step = a host "
                                                           "sync per step; device = on the GPU, counted at log steps; "
                                                           "auto = device on CUDA (not fp16), else step")
    stop_signal: str | None = _f("SIGUSR1", "a pre-warning signal that, like SIGTERM and SIGINT, makes the run "
                                 "finish its step, checkpoint and exit 0 (SLURM: --signal=USR1@90); none = only those")
    phema_sigma_rels: list[float] = _f([], "post-hoc EMA (EDM2): relative widths of the power-function EMA profiles "
                                       "to track, e.g. 0.05,0.10; snapshots in RUN/phema let `python -m "
                                       "sit_atconv.phema` rebuild any width later; none = off")
    phema_every: int = _f(10_000, "steps between post-hoc EMA snapshots (one model copy per width on disk each)")


@dataclass
class LogConfig:
    results_dir: str = _f("results", "folder that holds run folders")
    run_name: str | None = _f(None, "run folder name; none = <model>-<mixer>-<data source>")
    ckpt_every: int = _f(50_000, "steps between checkpoints")
    keep_last: int = _f(2, "rolling checkpoints kept (0 = all)")
    keep_every: int | None = _f(100_000, "checkpoints at multiples of this are never deleted")
    preview_every: int = _f(10_000, "steps between previews: EMA sample grids (diffusion), held-out accuracy "
                            "(classification); 0 = never")
    log_every: int = _f(100, "steps between metric logs")
    trackers: list[Literal["wandb", "tensorboard"]] = _f([], "experiment trackers, e.g. wandb,tensorboard")
    wandb_project: str = _f("sit_atconv", "wandb project name")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
def nearest(word: str, options: list[str]) -> str:
    """"; did you mean 'X'?" for the closest option, or ''."""
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


# ------------------------------------------------------------------------------------------ validation

def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


POSITIVE = ("model.depth", "model.hidden_size", "model.patch_size", "model.num_heads", "model.input_size",
            "model.in_channels", "model.num_classes", "model.kernel_size", "transport.num_steps",
            "data.image_size", "data.latent_scale", "optim.lr", "optim.eps", "optim.grad_clip",
            "train.global_batch_size", "train.max_steps", "log.ckpt_every", "log.keep_every", "log.log_every",
            "classifier.in_chans", "classifier.num_classes", "classifier.input_size", "optim.lr_reference_batch",
            "augment.repeats", "repa.depth", "repa.encoder_resolution", "repa.encoder_dim",
            "repa.projector_dim", "train.phema_every")
NON_NEGATIVE = ("transport.cfg_scale", "repa.coeff", "data.num_workers", "optim.weight_decay", "optim.warmup_steps",
                "optim.warmup_lr", "optim.min_lr", "train.seed", "train.max_bad_steps", "log.keep_last",
                "log.preview_every", "augment.color_jitter", "augment.mixup", "augment.cutmix", "augment.shift")
UNIT_INTERVAL = ("model.class_dropout_prob", "train.ema_decay", "classifier.drop_path", "augment.random_erase",
                 "augment.label_smoothing")  # [0, 1)


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _validate_model(m: ModelConfig) -> None:
    """A zoo name or a complete explicit architecture, never both; shapes that fit together."""
    given = [k for k in ARCHITECTURE if getattr(m, k) is not None]
    missing = [k for k in ARCHITECTURE if getattr(m, k) is None]
    if m.name is not None:
        _check(m.name in list_sit_models(), f"model.name: {m.name!r} is not a zoo size SiT-{{S,B,L,XL}}/{{2,4,8}}"
               + nearest(m.name, list_sit_models()) + "; or set it to none for an explicit architecture")
        if given:
            raise ConfigError(f"model.{given[0]}: set together with model.name={m.name}; give either a zoo name or "
                              f"an explicit architecture (model.name none and {', '.join(ARCHITECTURE)})")
    elif missing:
        raise ConfigError(f"model.name is none, so the architecture is explicit: set model.{missing[0]} (all of "
                          f"{', '.join(ARCHITECTURE)}), or name a zoo size such as SiT-S/2")
    else:
        _check(m.patch_size in PATCH_SIZES, f"model.patch_size: must be one of {PATCH_SIZES}, got {m.patch_size}")
    a = m.architecture()
    _check(a["hidden_size"] % a["num_heads"] == 0,
           f"model.hidden_size={a['hidden_size']} is not divisible by model.num_heads={a['num_heads']}")
    _check(m.input_size % a["patch_size"] == 0,
           f"model.input_size={m.input_size} is not divisible by the patch size {a['patch_size']}")
    _check(m.kernel_size % 2 == 1, f"model.kernel_size: must be odd, got {m.kernel_size}")


def _validate_classifier(c: ClassifierConfig) -> None:
    """A zoo variant or a complete explicit AttNet architecture with one entry per stage."""
    given = [k for k in CLASSIFIER_ARCHITECTURE if getattr(c, k) is not None]
    if c.name is not None:
        _check(c.name in ATTNET_NAMES, f"classifier.name: {c.name!r} is not an AttNet variant"
               + nearest(c.name, list(ATTNET_NAMES)) + f" ({', '.join(ATTNET_NAMES)}; or none)")
        if given:
            raise ConfigError(f"classifier.{given[0]}: set together with classifier.name={c.name}; give either a "
                              "variant or an explicit architecture (classifier.name none)")
        return
    missing = [k for k in CLASSIFIER_ARCHITECTURE if getattr(c, k) is None]
    if missing:
        raise ConfigError(f"classifier.name is none, so the architecture is explicit: set classifier.{missing[0]} "
                          f"(all of {', '.join(CLASSIFIER_ARCHITECTURE)})")
    stages = {len(c.depths), len(c.dims), len(c.exp_rates)}
    _check(len(stages) == 1, "classifier.depths, dims and exp_rates need one entry per stage each")
    _check(min(c.depths + c.dims) > 0 and min(c.exp_rates) > 0, "classifier: depths, dims, exp_rates must be > 0")


def validate(cfg: RunConfig) -> RunConfig:
    """Range and consistency checks that types alone cannot express; returns `cfg`."""
    for key in POSITIVE:
        v = _get(cfg, key)
        _check(v is None or v > 0, f"{key}: must be {'a positive integer' if isinstance(v, int) else '> 0'}, "
                                   f"got {v}")
    for key in NON_NEGATIVE:
        _check(_get(cfg, key) >= 0, f"{key}: must be >= 0, got {_get(cfg, key)}")
    for key in UNIT_INTERVAL:
        _check(0.0 <= _get(cfg, key) < 1.0, f"{key}: must be in [0, 1), got {_get(cfg, key)}")
    _validate_model(cfg.model)
    _validate_classifier(cfg.classifier)
    t, o, lg = cfg.transport, cfg.optim, cfg.log
    if cfg.train.task == "classification":
        _check(cfg.data.source in ("digits", "images"), f"data.source={cfg.data.source}: classification trains on "
               "digits or an image folder (images)")
    methods = ODE_METHODS if t.sample_mode == "ode" else SDE_METHODS
    _check(t.sampling_method in methods,
           f"transport.sampling_method: {t.sampling_method!r} is not a {t.sample_mode} method "
           f"({', '.join(methods)})" + nearest(t.sampling_method, list(methods)))
    for key in ("train_eps", "sample_eps"):
        v = getattr(t, key)
        _check(v is None or 0.0 <= v < 0.5, f"transport.{key}: must be in [0, 0.5) or none, got {v}")
    for key in ("time_std", "time_shift"):
        _check(math.isfinite(getattr(t, key)) and getattr(t, key) > 0,
               f"transport.{key}: must be a finite number > 0, got {getattr(t, key)}")
    _check(math.isfinite(t.time_mean), f"transport.time_mean: must be finite, got {t.time_mean}")
    _check(t.time_sampling == "logit_normal" or (t.time_mean, t.time_std) == (0.0, 1.0),
           "transport.time_mean/time_std shape the logit_normal draw only: set transport.time_sampling=logit_normal, "
           "or leave them at 0 and 1")
    _check(cfg.data.autoencoder is None or bool(cfg.data.autoencoder.strip()),
           "data.autoencoder: empty; use identity, a hub id, a folder, or none")
    _check(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas: each must be in [0, 1), got {o.betas}")
    _check(len(set(lg.trackers)) == len(lg.trackers), f"log.trackers: repeated entries in {lg.trackers}")
    _check(cfg.train.stop_signal is None or isinstance(getattr(signal, cfg.train.stop_signal, None), signal.Signals),
           f"train.stop_signal: {cfg.train.stop_signal!r} is not a signal name such as SIGUSR1")
    _check(bool(cfg.train.resume.strip()), "train.resume: empty; use 'auto', 'none' or a checkpoint path")
    rels = cfg.train.phema_sigma_rels
    _check(all(0.0 < s <= MAX_SIGMA_REL for s in rels) and len(set(rels)) == len(rels),
           f"train.phema_sigma_rels: each must be in (0, {MAX_SIGMA_REL:.4f}] and listed once, got {rels}")
    _check(lg.run_name is None or ("/" not in lg.run_name and lg.run_name not in ("", ".", "..")),
           f"log.run_name: {lg.run_name!r} must be a plain folder name")
    return cfg


# ------------------------------------------------------------------------------------ dict round trip

def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (lists, not tuples) suitable for YAML/JSON and checkpoints."""
    out = dataclasses.asdict(cfg)
    return {s: {k: list(v) if isinstance(v, tuple) else v for k, v in vals.items()} for s, vals in out.items()}

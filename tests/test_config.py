"""Config: defaults, YAML diffs with `base:`, CLI overrides and aliases, validation errors, round trip."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from conftest import exit_code

import train as train_cli
from sit_atconv.cli import CLIParser
from sit_atconv.config import RunConfig, config_to_dict
from sit_atconv.config_io import (
    ALIASES,
    CONFIG_DIR,
    add_config_options,
    all_keys,
    config_from_args,
    config_from_dict,
    load_config,
    migrate_saved,
    save_config,
)
from sit_atconv.errors import ConfigError

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def build_parser():
    return add_config_options(CLIParser(__doc__))


def parse_args(argv):
    """(config, namespace) as train.py parses them."""
    ns = build_parser().parse_args(argv)
    return config_from_args(ns), ns


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_are_the_paper_protocol():
    cfg = RunConfig()
    assert (cfg.model.name, cfg.model.mixer, cfg.model.learn_sigma) == ("SiT-XL/2", "atconv", True)
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes) == (32, 4, 1000)
    assert cfg.model.class_dropout_prob == 0.1 and cfg.model.kernel_size == 3
    assert (cfg.transport.path_type, cfg.transport.prediction, cfg.transport.loss_weight) == (
        "Linear", "velocity", None)
    assert (cfg.data.autoencoder, cfg.data.latent_scale) == (None, None)  # the latent store's own
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.global_batch_size) == (1e-4, 0.0, 256)
    assert (cfg.train.ema_decay, cfg.train.max_steps) == (0.9999, 400_000)
    assert cfg.model.architecture() == {"depth": 28, "hidden_size": 1152, "patch_size": 2, "num_heads": 16}


def test_shipped_configs_exist():
    assert {"digits", "imagenet256_sit_s2", "imagenet256_sit_b2", "imagenet256_sit_l2", "imagenet256_sit_xl2",
            "imagenet512_sit_xl2", "ffhq256"} <= set(SHIPPED)


DIFFUSION = [n for n in SHIPPED if load_config(n).train.task == "diffusion"]


@pytest.mark.parametrize("name", DIFFUSION)
@pytest.mark.parametrize("mixer", ["attn", "atconv", "hybrid"])
def test_every_shipped_config_loads_and_mixer_switches(name, mixer):
    cfg = load_config(name, [f"model.mixer={mixer}"])
    assert cfg.model.mixer == mixer
    assert load_config(name).model.mixer == "atconv"
    cli, _ = parse_args(["--config", name, "--mixer", mixer])
    assert cli == cfg


@pytest.mark.parametrize("name", sorted(set(SHIPPED) - set(DIFFUSION)))
def test_classification_configs_load_and_refuse_sit_options(name):
    cfg = load_config(name)
    assert cfg.train.task == "classification" and parse_args(["--config", name])[0] == cfg
    with pytest.raises(ConfigError, match="has no effect on a classification run"):
        parse_args(["--config", name, "--mixer", "attn"])


def test_shipped_values():
    digits = load_config("digits")
    assert digits.model.name is None  # an explicit architecture, not a modified zoo size
    assert (digits.model.depth, digits.model.hidden_size, digits.model.num_heads, digits.model.patch_size) == (
        4, 96, 4, 4)
    assert (digits.model.input_size, digits.model.in_channels, digits.model.num_classes) == (16, 1, 10)
    assert (digits.data.source, digits.data.autoencoder, digits.data.image_size) == ("digits", "identity", 16)
    assert (digits.optim.lr, digits.train.global_batch_size, digits.train.ema_decay) == (2e-3, 128, 0.995)
    assert digits.train.max_steps == 1800 and digits.model.learn_sigma is False
    assert (digits.optim.schedule, digits.optim.warmup_steps, digits.transport.cfg_scale) == ("cosine", 100, 1.25)
    assert digits.train.mixed_precision == "no"
    assert digits.transport.cfg_scale > 1.0
    for size in ("s", "b", "l", "xl"):
        cfg = load_config(f"imagenet256_sit_{size}2")
        assert cfg.model.name == f"SiT-{size.upper()}/2"
        assert (cfg.train.mixed_precision, cfg.model.input_size) == ("bf16", 32)
        assert cfg.train.global_batch_size == 256
        assert (cfg.data.source, cfg.model.learn_sigma, cfg.train.max_steps) == ("latents", True, 400_000)
    big = load_config("imagenet512_sit_xl2")
    assert (big.model.input_size, big.data.image_size, big.model.name) == (64, 512, "SiT-XL/2")
    ffhq = load_config("ffhq256")
    assert (ffhq.model.num_classes, ffhq.model.class_dropout_prob, ffhq.train.global_batch_size) == (1, 0.0, 128)
    tiny = load_config("tiny")
    assert (tiny.model.depth, tiny.model.hidden_size, tiny.train.max_steps, tiny.log.preview_every) == (2, 32, 20, 0)
    assert (tiny.model.patch_size, tiny.optim.schedule, tiny.transport.cfg_scale) == (2, "constant", 2.0)  # pinned
    assert parse_args([])[0] == digits  # --config defaults to digits


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path / "exp.yaml", """
        base: %s
        model:
          depth: 2
        optim:
          lr: 1.0e-3
        train:
          mixed_precision: no
    """ % (CONFIG_DIR / "digits.yaml"))
    cfg = load_config(path)
    assert cfg.model.depth == 2                     # this file
    assert cfg.model.hidden_size == 96              # same section, inherited from base
    assert cfg.train.ema_decay == 0.995             # other section, inherited from base
    assert cfg.optim.eps == 1e-8                    # dataclass default
    assert cfg.train.mixed_precision == "no"        # bare YAML `no` is the string, not False
    cli, _ = parse_args(["--config", str(path), "--optim.lr", "0.5", "--max-steps", "7",
                         "--model.depth", "3"])
    assert (cli.optim.lr, cli.train.max_steps, cli.model.depth, cli.model.hidden_size) == (0.5, 7, 3, 96)
    assert load_config(path, ["optim.lr=0.25"]).optim.lr == 0.25


def test_base_by_name(tmp_path):
    cfg = load_config(write(tmp_path / "x.yaml", "base: digits\nmodel:\n  depth: 1\n"))
    assert (cfg.model.depth, cfg.model.hidden_size) == (1, 96)
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_config(write(tmp_path / "y.yaml", "base: digit.yaml\n"))


def test_circular_base(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("alias,value,key,expected", [
    ("--results-dir", "out", "log.results_dir", "out"), ("--max-steps", "12", "train.max_steps", 12),
    ("--ckpt-every", "5", "log.ckpt_every", 5), ("--resume", "none", "train.resume", "none"),
    ("--seed", "3", "train.seed", 3), ("--global-batch-size", "64", "train.global_batch_size", 64),
    ("--mixed-precision", "bf16", "train.mixed_precision", "bf16"),
    ("--data-path", "/x/y", "data.data_path", "/x/y"), ("--model", "SiT-B/4", "model.name", "SiT-B/4"),
    ("--mixer", "hybrid", "model.mixer", "hybrid"), ("--run-name", "mine", "log.run_name", "mine"),
])
def test_aliases(alias, value, key, expected):
    assert ALIASES[alias] == key
    cfg, _ = parse_args(["--config", "imagenet256_sit_xl2", alias, value])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == expected


def test_cli_booleans_lists_and_none():
    cfg, _ = parse_args(["--model.learn_sigma", "true", "--train.compile", "False",
                         "--optim.betas", "0.8,0.95",
                         "--log.trackers", "wandb,tensorboard", "--log.keep_every", "none",
                         "--transport.train_eps", "1e-5", "--optim.grad_clip", "1"])
    assert cfg.model.learn_sigma is True and cfg.train.compile is False
    assert cfg.optim.betas == (0.8, 0.95) and cfg.log.trackers == ["wandb", "tensorboard"]
    assert cfg.log.keep_every is None and cfg.transport.train_eps == 1e-5 and cfg.optim.grad_clip == 1.0
    assert parse_args(["--log.trackers", "none"])[0].log.trackers == []


def test_unknown_yaml_key_names_nearest(tmp_path):
    path = write(tmp_path / "typo.yaml", "model:\n  dpeth: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.dpeth'.*did you mean 'model.depth'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config section 'optimm'.*'optim'"):
        load_config(write(tmp_path / "sec.yaml", "optimm:\n  lr: 1\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'log.ckpt_every'"):
        load_config("digits", ["log.ckpt_evry=3"])
    with pytest.raises(ConfigError, match=r"config 'digts' not found.*did you mean 'digits'"):
        load_config("digts")


@pytest.mark.parametrize("argv,needle", [
    (["--model.dpeth", "3"], "did you mean '--model.depth'"),
    (["--max-step", "3"], "did you mean '--max-steps'"),
    (["--train.global_batch_size", "-4"], "train.global_batch_size: must be a positive integer, got -4"),
    (["--mixer", "atconf"], "did you mean 'atconv'"),
    (["--model.learn_sigma", "maybe"], "model.learn_sigma: expected true or false"),
    (["--optim.max_steps", "3"], "config key 'optim.max_steps' (override) has moved to 'train.max_steps'"),
    (["--log.resume", "none"], "has moved to 'train.resume'"),
    (["--config", "imagenet256_sit_s2", "--model.depth", "4"], "model.depth: set together with model.name=SiT-S/2"),
    (["--model.depth", "none"], "model.name is none, so the architecture is explicit: set model.depth"),
])
def test_cli_errors_are_one_line_exit_2(argv, needle, capsys):
    assert exit_code(train_cli.main, [*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("override,needle", [
    ("train.global_batch_size=-4", "train.global_batch_size: must be a positive integer"),
    ("model.mixer=atconf",
     "model.mixer: expected one of attn, atconv, hybrid, got 'atconf'; did you mean 'atconv'"),
    ("model.depth=four", "model.depth: expected an integer, got 'four'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("train.ema_decay=1.5", "train.ema_decay: must be in [0, 1)"),
    ("model.name=SiT-XXL/2", "model.name: 'SiT-XXL/2' is not a zoo size SiT-"),
    ("model.patch_size=3", "model.patch_size: must be one of (2, 4, 8)"),
    ("optim.betas=0.9", "optim.betas: expected 2 comma-separated values"),
    ("model.input_size=15", "not divisible by the patch size 4"),
    ("transport.sampling_method=dopri5", "not a sde method"),
    ("model.class_dropout_prob=1", "model.class_dropout_prob: must be in [0, 1)"),
    ("model.kernel_size=4", "odd"),
    ("log.trackers=wandb,tensorbord", "did you mean 'tensorboard'"),
    ("train.mixed_precision=fp8", "train.mixed_precision: expected one of no, bf16, fp16"),
    ("model.hidden_size=65", "not divisible by model.num_heads=4"),
    ("lr=3", "unknown config key 'lr'"),
])
def test_bad_values(override, needle):
    base = ["transport.sample_mode=sde"] if "sampling_method" in override else []
    with pytest.raises(ConfigError) as exc:
        load_config("digits", base + [override])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_bad_yaml_types(tmp_path):
    with pytest.raises(ConfigError, match="train.global_batch_size: expected an integer"):
        load_config(write(tmp_path / "t.yaml", "train:\n  global_batch_size: [1, 2]\n"))
    with pytest.raises(ConfigError, match="'optim.global_batch_size' in .* has moved to 'train.global_batch_size'"):
        load_config(write(tmp_path / "old.yaml", "optim:\n  global_batch_size: 8\n"))
    with pytest.raises(ConfigError, match="model.learn_sigma: expected true or false"):
        load_config(write(tmp_path / "u.yaml", "model:\n  learn_sigma: 3\n"))


def test_save_config_round_trip(tmp_path):
    cfg, _ = parse_args(["--config", "imagenet256_sit_b2", "--mixer", "hybrid", "--optim.betas", "0.8,0.9",
                         "--log.trackers", "tensorboard", "--data-path", "/data/store",
                         "--optim.grad_clip", "2"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temp file left
    loaded = yaml.safe_load(path.read_text())
    assert loaded["model"]["mixer"] == "hybrid" and loaded["optim"]["betas"] == [0.8, 0.9]
    assert config_from_dict(loaded) == cfg
    assert load_config(path) == cfg  # a saved config is also a valid config file
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="did you mean 'model.mixer'"):
        config_from_dict({"model": {"mixxer": "attn"}})


def test_help_lists_every_field_with_default_and_type():
    text = " ".join(build_parser().format_help().split())
    for key in all_keys():
        assert f"--{key} " in text, key
    for alias in ALIASES:
        assert alias in text
    assert "--optim.lr FLOAT" in text and "(default: 0.0001)" in text and "(default: none)" in text
    assert "--model.mixer {attn,atconv,hybrid}" in text and "--config CONFIG" in text
    assert "optim: The optimizer and its schedule." in text and "--optim.max_steps" not in text


def test_a_config_saved_by_the_previous_layout_migrates():
    """Checkpoints written before the train section existed still load (and mean the same run)."""
    old = {"model": {"name": "SiT-S/2", "depth": 4, "hidden_size": 64, "num_heads": 4, "input_size": 16,
                     "in_channels": 1, "num_classes": 10, "learn_sigma": False},
           "data": {"source": "digits", "image_size": 16, "autoencoder": "identity", "latent_scale": 0.18215},
           "optim": {"lr": 2e-3, "global_batch_size": 128, "max_steps": 1000, "ema_decay": 0.995, "seed": 3},
           "log": {"run_name": "digits", "resume": "auto"}}
    cfg = config_from_dict(old)
    assert cfg.model.name is None and cfg.model.architecture() == {"depth": 4, "hidden_size": 64, "patch_size": 2,
                                                                    "num_heads": 4}
    assert (cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.seed, cfg.train.resume) == (128, 1000, 3,
                                                                                                       "auto")
    assert migrate_saved(config_to_dict(cfg)) == config_to_dict(cfg)  # today's layout is left alone
    with pytest.raises(ConfigError, match="has moved"):
        config_from_dict(old, saved=False)

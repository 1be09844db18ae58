"""REPA: the projector and its tokens, the alignment loss, config resolution, training with on-the-fly and
stored encoder features, exact resume, two identical ranks, and projector-free exports."""

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import debug_launcher
from conftest import fake_state, reset_accelerate, tiny_config

from sit_atconv.build import build_model, load_run, resolve_repa
from sit_atconv.checkpoint import EXPORT_KEYS, load_checkpoint, save_export
from sit_atconv.errors import ConfigError, RunError
from sit_atconv.models.sit import SiT
from sit_atconv.tasks.diffusion import alignment_loss
from sit_atconv.train import train

# a 0.4M-parameter timm ViT (patch 16, width 64) at 128 px: 8 x 8 patch tokens, the tiny SiT's token grid
REPA = ["repa.coeff=0.5", "repa.depth=1", "repa.encoder=test_vit", "repa.encoder_weights=random",
        "repa.projector_dim=32"]


def _tiny_sit(**kwargs) -> SiT:
    return SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=10,
               learn_sigma=False, **kwargs)


def test_projector_sees_the_tokens_after_its_block():
    torch.manual_seed(0)
    model = _tiny_sit(repa_depth=2, repa_dim=5, projector_dim=16).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 9])
    out, features = model(x, t, y, return_features=True)
    tokens = model.x_embedder(x) + model.pos_embed if model.use_pos_embed else model.x_embedder(x)
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks[:2]:
        tokens = block(tokens, c)
    assert features.shape == (3, 16, 5)
    torch.testing.assert_close(features, model.projectors[0](tokens))
    torch.testing.assert_close(out, model(x, t, y))  # the prediction does not change
    hidden = [m.out_features for m in model.projectors[0] if isinstance(m, torch.nn.Linear)]
    assert hidden == [16, 16, 5]  # REPA's MLP: two SiLU hidden layers, then the encoder width


def test_a_model_without_repa_has_no_projector_and_refuses_features():
    model = _tiny_sit()
    assert not any(k.startswith("projectors.") for k in model.state_dict())
    with pytest.raises(ValueError, match="REPA model"):
        model(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([1]), return_features=True)


def test_alignment_loss_is_minus_the_mean_cosine():
    torch.manual_seed(0)
    a, b = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    expected = -(F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(alignment_loss(a, b), expected)
    assert alignment_loss(a, 3 * a).item() == pytest.approx(-1.0)


def test_resolution_matches_the_encoder_grid_to_the_token_grid(tmp_path):
    cfg = resolve_repa(tiny_config(tmp_path, "r", *REPA))
    assert (cfg.repa.encoder_dim, cfg.repa.encoder_resolution) == (64, 128)  # 16 px patches x 8 tokens
    with pytest.raises(ConfigError, match="patch tokens but the model has 64"):
        resolve_repa(tiny_config(tmp_path, "r", *REPA, "repa.encoder_resolution=160"))
    with pytest.raises(ConfigError, match="repa.encoder_weights is not set"):
        resolve_repa(tiny_config(tmp_path, "r", *REPA, "repa.encoder_weights=none"))
    with pytest.raises(ConfigError, match="beyond the model's 2 blocks"):
        resolve_repa(tiny_config(tmp_path, "r", *REPA, "repa.depth=3"))
    with pytest.raises(ConfigError, match="not a timm model"):
        resolve_repa(tiny_config(tmp_path, "r", *REPA, "repa.encoder=no_such_net"))
    assert resolve_repa(tiny_config(tmp_path, "r")).repa.encoder_dim is None  # REPA off: nothing resolved


def _weights(run_dir):
    state = load_checkpoint(run_dir)
    return state["model"], state["ema"]


def test_repa_trains_resumes_bit_exactly_and_exports_without_projector(tmp_path):
    full = train(tiny_config(tmp_path, "full", *REPA, "train.max_steps=8", "log.log_every=4"))
    reset_accelerate()
    train(tiny_config(tmp_path, "part", *REPA, "train.max_steps=4"))
    reset_accelerate()
    part = train(tiny_config(tmp_path, "part", *REPA, "train.max_steps=8"))
    for a, b in zip(_weights(full), _weights(part)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("projectors.0.") for k in _weights(full)[0])
    lines = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "repa_loss" in line]
    assert logged and all(-1.0 <= line["repa_loss"] <= 1.0 for line in logged)
    assert all(line["loss"] == pytest.approx(line["denoising_loss"] + 0.5 * line["repa_loss"], rel=1e-4)
               for line in logged)
    # sampling-only export: the EMA weights without the projector load as a plain SiT
    state = load_checkpoint(full)
    save_export(tmp_path / "export.pt", {k: state[k] for k in EXPORT_KEYS})
    run = load_run(tmp_path / "export.pt")
    assert not hasattr(run.model, "projectors")
    with_projector = load_run(full)
    torch.testing.assert_close(run.sampler().model(torch.zeros(2, 1, 16, 16), torch.full((2,), 0.5),
                                                   torch.tensor([1, 2])),
                               with_projector.sampler().model(torch.zeros(2, 1, 16, 16), torch.full((2,), 0.5),
                                                              torch.tensor([1, 2])))


def test_resume_refuses_a_changed_projector(tmp_path):
    train(tiny_config(tmp_path, "p", *REPA, "train.max_steps=2", "log.ckpt_every=2"))
    reset_accelerate()
    with pytest.raises(RunError, match="different REPA projector"):
        train(tiny_config(tmp_path, "p", "train.max_steps=4"))


def test_projector_is_part_of_the_model_config_record(tmp_path):
    cfg = resolve_repa(tiny_config(tmp_path, "r", *REPA))
    model = build_model(cfg)
    assert model.projectors[0][-1].out_features == cfg.repa.encoder_dim
    assert not hasattr(build_model(cfg, projector=False), "projectors")


def _two_rank_worker(cfg_path):
    import torch.distributed as dist
    from accelerate import Accelerator

    from sit_atconv.config_io import load_config
    from sit_atconv.train import train as run

    spec = json.loads(open(cfg_path).read())
    accelerator = Accelerator(cpu=True)
    run(load_config("tiny", spec["overrides"]), accelerator)
    live = accelerator.unwrap_model(accelerator._models[0])
    checksum = float(sum(p.double().sum() for p in live.parameters()))
    projector = float(sum(p.double().sum() for p in live.projectors.parameters()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (checksum, projector))
    if dist.get_rank() == 0:
        with open(spec["out"], "w") as f:
            json.dump(gathered, f)


@pytest.mark.slow
def test_two_ranks_with_repa_stay_identical(tmp_path):
    spec = tmp_path / "spec.json"
    overrides = [f"log.results_dir={tmp_path}", "log.run_name=ddp", "train.max_steps=4", "log.ckpt_every=4", *REPA]
    spec.write_text(json.dumps({"overrides": overrides, "out": str(tmp_path / "out.json")}))
    debug_launcher(_two_rank_worker, args=(str(spec),), num_processes=2)
    ranks = json.loads((tmp_path / "out.json").read_text())
    assert len(ranks) == 2 and ranks[0] == ranks[1]


def test_stored_features_train_without_the_encoder(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from sit_atconv.data import IdentityAutoencoder, load_vision_encoder
    from sit_atconv.data.extract_latents import extract_latents

    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i + 3 * (cls == "b")).integers(0, 256, (16, 16, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / cls / f"{i}.png")
    encoder = load_vision_encoder("vit_small_patch14_dinov2", "random", resolution=112, depth=1, embed_dim=32,
                                  num_heads=2)  # 8 x 8 patch tokens: the tiny SiT's grid on 16 px inputs
    extract_latents(tmp_path / "img", tmp_path / "store", IdentityAutoencoder(3), image_size=16, batch_size=4,
                    shard_size=4, num_workers=0, vision_encoder=encoder, state=fake_state())
    store = ["data.source=latents", f"data.data_path={tmp_path / 'store'}", "data.autoencoder=none",
             "model.in_channels=3", "model.num_classes=2", "repa.coeff=0.5", "repa.depth=1",
             "repa.encoder=vit_small_patch14_dinov2", "train.max_steps=3", "log.log_every=3"]
    import sit_atconv.data.vision_encoder as vision

    monkeypatch.setattr(vision, "load_vision_encoder", lambda *a, **k: pytest.fail("the encoder was loaded"))
    run = train(tiny_config(tmp_path, "stored", *store))
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "repa_loss" in line and load_checkpoint(run)["config"]["repa"]["encoder_dim"] == 32
    reset_accelerate()
    with pytest.raises(ConfigError, match="features come from vit_small_patch14_dinov2"):
        train(tiny_config(tmp_path, "other", *store[:-3], "train.max_steps=3"))

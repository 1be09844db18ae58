"""AttNet as a timm backbone: the interface timm's own model tests exercise, over every registered variant."""

import copy

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_feature_extractor, get_graph_node_names, get_notrace_functions, get_notrace_modules

import sit_atconv  # noqa: F401  (registers attnet_* with timm)
from sit_atconv.layers.atconv import ATConv
from sit_atconv.models import ATTNET_VARIANTS

SIZE = 64  # stem /4 then three /2: a 2x2 final map
REDUCTIONS = [4, 8, 16, 32]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(ATTNET_VARIANTS))
def variant(request) -> str:
    """Module-scoped, so pytest runs every test of one variant before building the next."""
    return request.param


@pytest.fixture(scope="module")
def model(variant) -> torch.nn.Module:
    """The variant with default arguments, seed 0, eval mode (tests that change it work on a copy)."""
    torch.manual_seed(0)
    return timm.create_model(f"attnet_{variant}").eval()


def _seeded(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


class _LeafTracer(torch.fx.Tracer):
    """torch.fx tracer with timm's no-trace lists (what timm's FX feature extractors pass to torchvision)."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


@pytest.fixture(scope="module")
def intermediates(model, x) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final map, every stage's output) of the variant's model on x, computed once."""
    with torch.no_grad():
        return model.forward_intermediates(x)


def test_head_paths(variant, model, intermediates, x):
    """forward = GAP -> LayerNorm -> Linear on forward_features (the digits extractor's path); timm's head resets."""
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, SIZE // 32, SIZE // 32)
        assert torch.equal(feats, intermediates[0])  # forward_intermediates' final map is forward_features
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert torch.equal(pre, model.norm(feats.mean(dim=(-2, -1))))
        assert torch.equal(model(x), model.head(pre))
        headless = copy.deepcopy(model)
        headless.reset_classifier(0)
        assert headless.num_classes == 0 and torch.equal(headless.forward_head(feats), pre)
        headless.reset_classifier(0, "")
        assert headless.forward_head(feats).shape == feats.shape
        unpooled = timm.create_model(f"attnet_{variant}", num_classes=0, global_pool="").eval()
        assert unpooled.num_classes == 0 and unpooled(x).shape == feats.shape


def test_features_only_matches_feature_info(variant, model, intermediates, x):
    dims = list(ATTNET_VARIANTS[variant].dims)
    features = _seeded(f"attnet_{variant}", features_only=True)
    assert features.feature_info.channels() == dims and features.feature_info.reduction() == REDUCTIONS
    assert [info["module"] for info in model.feature_info] == [f"stages.{i}" for i in range(4)]
    with torch.no_grad():
        outs = features(x)
    assert [o.shape for o in outs] == [(2, c, SIZE // r, SIZE // r) for c, r in zip(dims, REDUCTIONS)]
    assert all(torch.equal(a, b) for a, b in zip(outs, intermediates[1]))  # same seed, same weights


def test_features_only_out_indices(x):
    model = _seeded("attnet_xs")
    picked = _seeded("attnet_xs", features_only=True, out_indices=(1, 2))
    assert picked.feature_info.channels() == [80, 160] and picked.feature_info.reduction() == [8, 16]
    assert len(picked.model.stages) == 3 and picked.model.head_hidden_size == 160  # stage 3 and the head pruned
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
        assert all(torch.equal(a, b) for a, b in zip(picked(x), inter[1:3]))


def test_forward_intermediates_and_pruning(model, intermediates, x):
    final, inter = intermediates
    assert len(inter) == 4 and torch.equal(inter[-1], final)
    assert [t.shape[1] for t in inter] == [info["num_chs"] for info in model.feature_info]
    with torch.no_grad():
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last_two) == 2 and all(torch.equal(a, b) for a, b in zip(last_two, inter[2:]))
        early, picked = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(early, inter[1]) and len(picked) == 1 and torch.equal(picked[0], inter[1])
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(pruned.stages) == 2 and pruned.num_features == model.feature_info[1]["num_chs"]
        kept = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(kept, inter[:2]))
        assert torch.equal(pruned(x), inter[1])  # no head or head norm left: the last kept map


def test_backward_reaches_every_parameter_with_and_without_checkpointing(model, x):
    """num_classes=42, train mode (drop path on): every parameter gets a gradient; grad checkpointing gives the
    same outputs and gradients, and really recomputes (the block's forward runs again in backward). 32x32 input:
    the smallest the stem and three downsamplers allow (a 1x1 final map), to keep two backward passes cheap."""
    x = x[..., :32, :32]
    net = copy.deepcopy(model).train()
    net.reset_classifier(42)
    calls = []
    net.stages[0][0].register_forward_pre_hook(lambda *_: calls.append(1))
    results = []
    for enable in (False, True):
        net.set_grad_checkpointing(enable)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = net(x)
        out.square().mean().backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert not missing, f"no gradient for {missing[:5]}"
        results.append((out, [p.grad for p in net.parameters()]))
    assert len(calls) == 1 + 2  # plain: once; checkpointed: forward + recomputation
    (ref, ref_grads), (out, grads) = results
    assert ref.shape == (2, 42) and torch.isfinite(ref).all() and torch.equal(out, ref)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, ref_grads))


def test_fx_trace_matches_eager(variant, model, x):
    graph = _LeafTracer().trace(model)
    traced = torch.fx.GraphModule(model, graph)
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    leaves = [name for name in calls if isinstance(traced.get_submodule(name), ATConv)]
    assert len(leaves) == sum(ATTNET_VARIANTS[variant].depths)  # one opaque call per block
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing")
def test_timm_fx_feature_extractor_forward_and_backward(x):
    """timm's FX path (torchvision's extractor with timm's leaf list) on the smallest variant."""
    model = _seeded("attnet_xxs", num_classes=42).train()
    _, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, {"head": "out"})
    out = extractor(x)["out"]
    out.mean().backward()
    assert out.shape == (2, 42) and all(p.grad is not None for p in extractor.parameters())
    assert sum(p.numel() for p in extractor.parameters()) == sum(p.numel() for p in model.parameters())
    assert eval_nodes[-1] == "head" and "stages.0.0.token_mixer" in eval_nodes
    with torch.no_grad():
        graph_features = _seeded("attnet_xxs", features_only=True, feature_cls="fx")(x)
        getter_features = _seeded("attnet_xxs", features_only=True)(x)
    assert all(torch.equal(a, b) for a, b in zip(graph_features, getter_features))


def test_default_cfg(variant, model):
    name, state = f"attnet_{variant}", model.state_dict()
    cfg = model.pretrained_cfg
    assert cfg is model.default_cfg and cfg == timm.models.get_pretrained_cfg(name).to_dict()
    expected = {"architecture": name, "tag": "in1k", "url": "", "hf_hub_id": None, "num_classes": 1000,
                "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875, "interpolation": "bicubic",
                "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    assert {k: cfg.get(k) for k in expected} == expected
    assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]
    assert state[cfg["classifier"] + ".weight"].shape == (cfg["num_classes"], model.head_hidden_size)
    assert cfg["pool_size"] == tuple(s // model.feature_info[-1]["reduction"] for s in cfg["input_size"][1:])


def test_constructor_arguments_are_honoured(x):
    row = ATTNET_VARIANTS["xxs"]
    default = timm.create_model("attnet_xxs")
    assert default.stages[-1][-1].drop_path.drop_prob == pytest.approx(row.drop_path_rate)
    model = timm.create_model("attnet_xxs", in_chans=1, drop_path_rate=0.3, num_classes=5)
    blocks = [b for stage in model.stages for b in stage]
    assert isinstance(blocks[0].drop_path, torch.nn.Identity) and blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert model.eval()(x[:, :1]).shape == (2, 5)
    with torch.no_grad():
        assert _seeded("attnet_xxs", global_pool="max")(x).shape == (2, 1000)
        assert _seeded("attnet_xxs", num_classes=3, global_pool="")(x).shape == (2, 3, 2, 2)  # per-position logits
    with pytest.raises(ValueError, match="catavgmax"):
        model.reset_classifier(3, "catavgmax")

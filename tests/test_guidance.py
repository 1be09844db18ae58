"""Classifier-free guidance: the combine rule, the DiT/SiT channel quirk, batching and the interval."""

import pytest
import torch

from sit_atconv.transport import CFGModel, cfg_combine

NUM_CLASSES = 5


class RecordingModel:
    """model(x, t, y) whose output depends on x, t and y; records each call's batch."""

    def __init__(self, out_channels_factor=1):
        self.calls = []
        self.factor = out_channels_factor
        self.table = torch.randn(NUM_CLASSES + 1, 4)  # row NUM_CLASSES is the null class

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        out = x * (1 + t[:, None, None, None]) + self.table[y][:, :, None, None]
        return torch.cat([out, out**2][: self.factor], dim=1)

    def single(self, x, t, y):
        """The same model on one label set, without recording."""
        calls = list(self.calls)
        out = self(x, t, y)
        self.calls = calls
        return out


def _inputs(batch=6):
    return torch.randn(batch, 4, 3, 3), torch.rand(batch), torch.randint(0, NUM_CLASSES, (batch,))


def test_cfg_combine_formula_and_guided_channels():
    cond, uncond = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    full = cfg_combine(cond, uncond, 4.0)
    torch.testing.assert_close(full, uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), uncond)
    quirk = cfg_combine(cond, uncond, 4.0, guided_channels=3)
    torch.testing.assert_close(quirk[:, :3], full[:, :3])
    torch.testing.assert_close(quirk[:, 3:], cond[:, 3:])
    for bad in (0, 9):
        with pytest.raises(ValueError, match="guided_channels"):
            cfg_combine(cond, uncond, 4.0, guided_channels=bad)


def test_scale_one_and_unconditional_models_are_plain_calls():
    x, t, y = _inputs()
    model = RecordingModel()
    torch.testing.assert_close(
        CFGModel(model, scale=1.0, num_classes=NUM_CLASSES)(x, t, y), model.single(x, t, y)
    )
    assert [c[0] for c in model.calls] == [6]
    zeros = torch.zeros_like(y)
    out = CFGModel(model, scale=4.0, num_classes=1)(x, t, zeros)
    torch.testing.assert_close(out, model.single(x, t, zeros))
    assert [c[0] for c in model.calls] == [6, 6]


@pytest.mark.parametrize("factor,guided_channels", [(1, None), (2, None), (2, 3)])
def test_cfg_batches_cond_and_null_in_one_forward(factor, guided_channels):
    x, t, y = _inputs()
    model = RecordingModel(factor)
    out = CFGModel(model, scale=3.0, num_classes=NUM_CLASSES, guided_channels=guided_channels)(x, t, y)
    assert len(model.calls) == 1
    batch, t_seen, y_seen = model.calls[0]
    assert batch == 12
    torch.testing.assert_close(t_seen, torch.cat([t, t]))
    torch.testing.assert_close(y_seen, torch.cat([y, torch.full_like(y, NUM_CLASSES)]))
    cond, uncond = model.single(x, t, y), model.single(x, t, torch.full_like(y, NUM_CLASSES))
    assert out.shape == cond.shape == (6, 4 * factor, 3, 3)  # learn_sigma channels kept
    torch.testing.assert_close(out, cfg_combine(cond, uncond, 3.0, guided_channels))
    if guided_channels is not None:
        torch.testing.assert_close(out[:, guided_channels:], cond[:, guided_channels:])
        assert not torch.allclose(out[:, :guided_channels], cond[:, :guided_channels])


def test_guidance_interval_switches_at_its_bounds():
    x, _, y = _inputs()
    model = RecordingModel()
    wrapped = CFGModel(model, scale=3.0, num_classes=NUM_CLASSES, interval=(0.2, 0.7))
    null = torch.full_like(y, NUM_CLASSES)
    for value, inside in ((0.1, False), (0.2, True), (0.5, True), (0.7, True), (0.75, False)):
        model.calls.clear()
        t = torch.full((6,), value)
        out = wrapped(x, t, y)
        cond = model.single(x, t, y)
        if inside:
            assert [c[0] for c in model.calls] == [12]
            torch.testing.assert_close(out, cfg_combine(cond, model.single(x, t, null), 3.0))
        else:  # the unconditional half is not run
            assert [c[0] for c in model.calls] == [6]
            torch.testing.assert_close(out, cond)
    t = torch.tensor([0.1, 0.3, 0.9, 0.5, 0.0, 0.6])  # mixed batch: guided only where inside
    out = wrapped(x, t, y)
    cond, guided = model.single(x, t, y), cfg_combine(model.single(x, t, y), model.single(x, t, null), 3.0)
    inside = torch.tensor([False, True, False, True, False, True])
    torch.testing.assert_close(out[inside], guided[inside])
    torch.testing.assert_close(out[~inside], cond[~inside])
    with pytest.raises(ValueError, match="low <= high"):
        CFGModel(model, scale=3.0, num_classes=NUM_CLASSES, interval=(0.8, 0.2))

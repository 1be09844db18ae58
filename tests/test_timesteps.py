"""Training-time distributions: the draws follow the closed-form CDFs (Kolmogorov-Smirnov), `uniform` is
SiT's draw bit for bit, the shift moves mass the documented way and matches SD3's shift under t -> 1 - t,
and the config flags reach the transport. Convention under test: t = 0 noise, t = 1 data."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy import special, stats

from sit_atconv.build import build_transport
from sit_atconv.errors import ConfigError
from sit_atconv.transport import TimeSampling, create_transport, shift_time, unshift_time

N = 20_000
P_MIN = 1e-3  # a correct sampler fails a KS test at this level once in 1000 seeds


def draws(sampling: TimeSampling, low: float = 0.0, high: float = 1.0, seed: int = 0) -> np.ndarray:
    torch.manual_seed(seed)
    return sampling.sample(N, low=low, high=high, dtype=torch.float64).numpy()


def shifted_uniform_cdf(x, s):
    """P(s u / (1 + (s-1) u) <= x) = P(u <= x / (s - (s-1) x)), written here independently of the code."""
    return np.clip(x / (s - (s - 1) * x), 0, 1)


def logit_normal_cdf(x, mean, std, s=1.0):
    u = np.clip(x / (s - (s - 1) * x), 1e-300, 1 - 1e-16)
    return stats.norm.cdf((special.logit(u) - mean) / std)


@pytest.mark.parametrize("sampling, cdf", [
    (TimeSampling("logit_normal", 0.5, 0.8), lambda x: logit_normal_cdf(x, 0.5, 0.8)),
    (TimeSampling("logit_normal", -1.0, 1.5, shift=3.0), lambda x: logit_normal_cdf(x, -1.0, 1.5, 3.0)),
    (TimeSampling(shift=3.0), lambda x: shifted_uniform_cdf(x, 3.0)),
    (TimeSampling(shift=0.25), lambda x: shifted_uniform_cdf(x, 0.25)),
])
def test_draws_follow_the_closed_form_cdf(sampling, cdf):
    x = draws(sampling)
    assert stats.kstest(x, cdf).pvalue > P_MIN
    assert stats.kstest(x, lambda v: sampling.cdf(torch.from_numpy(v)).numpy()).pvalue > P_MIN  # the code's CDF
    assert stats.kstest(x, "uniform").pvalue < 1e-8  # the test has power: these are far from U[0, 1]


def test_uniform_is_sits_draw_bit_for_bit():
    """training_losses with the default options draws exactly what SiT's expression draws for the same seed."""
    x1 = torch.randn(64, 2, 4, 4)
    for transport in (create_transport(), create_transport("Linear", "score"), create_transport("VP")):
        t0, t1 = transport.interval(train=True)
        seen = {}

        def model(x, t, seen=seen):
            seen["x"], seen["t"] = x, t
            return torch.zeros_like(x)

        torch.manual_seed(7)
        transport.training_losses(model, x1)
        torch.manual_seed(7)
        noise = torch.randn_like(x1)
        t_old = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype) * (t1 - t0) + t0
        assert torch.equal(seen["t"], t_old)
        tb = t_old.view(-1, 1, 1, 1)
        alpha, sigma = transport.path.alpha(tb)[0], transport.path.sigma(tb)[0]
        assert torch.equal(seen["x"], alpha * x1 + sigma * noise)


def test_train_eps_window_is_kept():
    """A score model trains on [eps, 1 - eps]: the draw is mapped affinely into it, whatever the distribution."""
    transport = create_transport("Linear", "score", time_sampling="logit_normal", time_std=3.0, time_shift=0.2)
    t0, t1 = transport.interval(train=True)
    assert (t0, t1) == (1e-3, 1 - 1e-3)
    seen = []
    torch.manual_seed(0)
    transport.training_losses(lambda x, t: seen.append(t) or torch.zeros_like(x), torch.randn(N, 1))
    t = seen[0].double().numpy()
    assert t.min() >= t0 and t.max() <= t1
    expected = TimeSampling("logit_normal", 0.0, 3.0, 0.2)
    assert stats.kstest(t, lambda v: expected.cdf(torch.from_numpy(v), low=t0, high=t1).numpy()).pvalue > P_MIN


def test_shift_above_one_moves_mass_to_data():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_time(u, 1.0), u)
    assert shift_time(u, 3.0)[0] == 0 and shift_time(u, 3.0)[-1] == 1  # ends fixed
    assert (shift_time(u, 3.0)[1:-1] > u[1:-1]).all() and (shift_time(u, 1 / 3)[1:-1] < u[1:-1]).all()
    assert torch.allclose(unshift_time(shift_time(u, 3.0), 3.0), u)
    assert draws(TimeSampling(shift=3.0)).mean() > 0.6 > 0.4 > draws(TimeSampling(shift=1 / 3)).mean()


def test_sd3_shift_s_is_our_shift_one_over_s():
    """SD3 writes t_sd3 = 1 - t (1 = noise) and shifts t_sd3 -> s t_sd3 / (1 + (s-1) t_sd3)."""
    u = torch.rand(1000, dtype=torch.float64)
    for s in (0.5, 3.0, 6.9):
        sd3 = s * u / (1 + (s - 1) * u)
        assert torch.allclose(1 - sd3, shift_time(1 - u, 1 / s), atol=1e-12)
    # the whole recipe: logit-normal(m, std) then shift s in SD3's convention, flipped, is our from_noise_at_one
    m, std, s = 0.4, 1.2, 3.0
    rng = np.random.default_rng(0)
    t_sd3 = special.expit(m + std * rng.standard_normal(N))
    t_sd3 = s * t_sd3 / (1 + (s - 1) * t_sd3)
    ours = TimeSampling.from_noise_at_one("logit_normal", m, std, s)
    assert (ours.mean, ours.std, ours.shift) == (-m, std, 1 / s)
    assert stats.kstest(1 - t_sd3, lambda v: ours.cdf(torch.from_numpy(v)).numpy()).pvalue > P_MIN
    assert stats.ks_2samp(1 - t_sd3, draws(ours)).pvalue > P_MIN


def test_config_flags_reach_the_transport(tmp_path):
    cfg = tiny_config(tmp_path, "t", "transport.time_sampling=logit_normal", "transport.time_mean=-0.5",
                      "transport.time_std=0.7", "transport.time_shift=0.4")
    assert build_transport(cfg).time_sampling == TimeSampling("logit_normal", -0.5, 0.7, 0.4)
    assert build_transport(tiny_config(tmp_path, "u")).time_sampling == TimeSampling()
    for bad, message in [("transport.time_shift=0", "time_shift: must be a finite number > 0"),
                         ("transport.time_std=-1", "time_std: must be a finite number > 0"),
                         ("transport.time_mean=1", "logit_normal draw only"),
                         ("transport.time_sampling=lognormal", "did you mean 'logit_normal'")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, "x", bad)
    with pytest.raises(ValueError, match="time_shift"):
        TimeSampling(shift=float("nan"))
    with pytest.raises(ValueError, match="unknown time_sampling"):
        TimeSampling("beta")

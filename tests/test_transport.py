"""Transport math checked against Gaussian data, whose fields are known in closed form.

Data N(M, SIGMA) in 2-D with a full covariance. With x_t = alpha x1 + sigma x0 and C_t = alpha^2 SIGMA +
sigma^2 I: score = -C_t^-1 (x - alpha M), E[x0 | x_t] = sigma C_t^-1 (x - alpha M),
E[x1 | x_t] = M + alpha SIGMA C_t^-1 (x - alpha M), velocity = alpha' E[x1 | x_t] + sigma' E[x0 | x_t].
In the eigenbasis of SIGMA the probability-flow ODE is a per-coordinate affine map (the monotone map
between 1-D Gaussians), so ODE samples are checked point by point; SDE samples by their moments, within
4 standard errors. Convention under test: t = 0 noise, t = 1 data.
"""

import math

import pytest
import torch

from sit_atconv.transport import (
    DIFFUSION_FORMS,
    ODE_METHODS,
    CFGModel,
    Sampler,
    create_transport,
    expand_t,
)
from sit_atconv.transport.paths import PATHS

DT = torch.float64
M = torch.tensor([1.0, -0.5], dtype=DT)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=DT)
LAM, U = torch.linalg.eigh(SIGMA)
COMBOS = [(p, q) for p in ("Linear", "GVP", "VP") for q in ("velocity", "score", "noise")]
Z_SE = 4.0  # tolerance in standard errors


def coeffs(transport, t):
    t = torch.as_tensor(t, dtype=DT)
    (a, da), (s, ds) = transport.path.alpha(t), transport.path.sigma(t)
    return a, da, s, ds


def exact_fields(transport, x, t, mean=M):
    """Closed-form (velocity, score, noise) of Gaussian data at (x, t); t of shape (B,)."""
    a, da, s, ds = coeffs(transport, expand_t(t, x))
    prec = ((x - a * mean) @ U / (a**2 * LAM + s**2)) @ U.T  # C_t^-1 (x - alpha m)
    velocity = da * (mean + a * prec @ SIGMA) + ds * s * prec
    return velocity, -prec, s * prec


def gaussian_model(transport, mean=M):
    """The exact field in the transport's prediction type, called as model(x, t)."""
    index = {"velocity": 0, "score": 1, "noise": 2}[transport.prediction]
    return lambda x, t: exact_fields(transport, x, t, mean)[index]


def flow_map(transport, z, t0, t1, mean=M):
    """Exact probability-flow map from time t0 to t1 applied to z."""
    a0, _, s0, _ = coeffs(transport, t0)
    a1, _, s1, _ = coeffs(transport, t1)
    mu = mean @ U
    scale = ((a1**2 * LAM + s1**2) / (a0**2 * LAM + s0**2)).sqrt()
    return (a1 * mu + scale * (z @ U - a0 * mu)) @ U.T


def log_normal(x, mean, cov):
    d = x - mean
    return -0.5 * (d @ torch.linalg.inv(cov) * d).sum(1) - 0.5 * torch.logdet(2 * math.pi * cov)


def marginal(transport, t):
    a, _, s, _ = coeffs(transport, t)
    return a * M, a**2 * SIGMA + s**2 * torch.eye(2, dtype=DT)


def assert_moments(x, mean=M, cov=SIGMA):
    """Sample mean and covariance within Z_SE standard errors of the target."""
    n = x.shape[0]
    assert torch.isfinite(x).all()
    se_mean = (cov.diag() / n).sqrt()
    se_cov = ((cov.diag()[:, None] * cov.diag()[None] + cov**2) / n).sqrt()
    z_mean = ((x.mean(0) - mean) / se_mean).abs().max().item()
    z_cov = ((torch.cov(x.T) - cov) / se_cov).abs().max().item()
    assert z_mean < Z_SE and z_cov < Z_SE, (z_mean, z_cov)


def data_samples(n):
    return M + torch.randn(n, 2, dtype=DT) @ torch.linalg.cholesky(SIGMA).T


# ---------------------------------------------------------------- paths


def test_path_coefficients_closed_form_and_derivatives():
    t = torch.linspace(0.02, 0.98, 49, dtype=DT)
    beta = 0.1 + (1 - t) * 19.9
    log_alpha_vp = -0.25 * (1 - t) ** 2 * 19.9 - 0.05 * (1 - t)
    expected = {
        "Linear": (t, 1 - t, (1 - t) / t),
        "GVP": (
            torch.sin(math.pi * t / 2),
            torch.cos(math.pi * t / 2),
            math.pi / 2 / torch.tan(math.pi * t / 2),
        ),
        "VP": (log_alpha_vp.exp(), (1 - (2 * log_alpha_vp).exp()).sqrt(), beta / 2),
    }
    h = 1e-6
    for name, (alpha, sigma, g) in expected.items():
        path = PATHS[name]()
        (a, da), (s, ds) = path.alpha(t), path.sigma(t)
        torch.testing.assert_close(a, alpha, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s, sigma, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            da, (path.alpha(t + h)[0] - path.alpha(t - h)[0]) / (2 * h), rtol=1e-7, atol=1e-7
        )
        torch.testing.assert_close(
            ds, (path.sigma(t + h)[0] - path.sigma(t - h)[0]) / (2 * h), rtol=1e-7, atol=1e-7
        )
        torch.testing.assert_close(path.d_log_alpha(t), da / a)
        torch.testing.assert_close(path.drift_var(t), g)
    ends = torch.tensor([0.0, 1.0], dtype=DT)
    for name in ("Linear", "GVP"):
        path = PATHS[name]()
        torch.testing.assert_close(path.alpha(ends)[0], ends, atol=1e-15, rtol=0)  # t = 0 noise, t = 1 data
        torch.testing.assert_close(path.sigma(ends)[0], 1 - ends, atol=1e-15, rtol=0)
    vp = PATHS["VP"]()
    torch.testing.assert_close(vp.alpha(ends)[0], torch.tensor([math.exp(-5.025), 1.0], dtype=DT))
    torch.testing.assert_close(vp.sigma(ends)[0][1], torch.tensor(0.0, dtype=DT))


def test_interpolant_convention():
    """x_t = alpha x_data + sigma noise: t = 0 gives the noise, t = 1 the data."""
    noise, data = torch.randn(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT)
    for name in ("Linear", "GVP"):
        path = PATHS[name]()
        for t, want in ((0.0, noise), (1.0, data)):
            xt, _ = path.interpolate(torch.full((3, 1), t, dtype=DT), noise, data)
            torch.testing.assert_close(xt, want, atol=1e-15, rtol=0)
        t = torch.rand(3, 1, dtype=DT)
        xt, ut = path.interpolate(t, noise, data)
        h = 1e-6
        fd = (path.interpolate(t + h, noise, data)[0] - path.interpolate(t - h, noise, data)[0]) / (2 * h)
        torch.testing.assert_close(ut, fd, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("path_type", ["Linear", "GVP", "VP"])
def test_conversions_match_closed_form_gaussian_fields(path_type):
    transport = create_transport(path_type)
    path = transport.path
    x = torch.randn(64, 2, dtype=DT) * 2
    t = torch.rand(64, dtype=DT) * 0.9 + 0.05
    v, s, n = exact_fields(transport, x, t)
    tb = expand_t(t, x)
    torch.testing.assert_close(path.velocity_from_score(s, x, tb), v)
    torch.testing.assert_close(path.score_from_velocity(v, x, tb), s)
    torch.testing.assert_close(path.score_from_noise(n, x, tb), s)
    torch.testing.assert_close(path.noise_from_score(s, x, tb), n)
    a = path.alpha(tb)[0]
    torch.testing.assert_close(path.data_from_score(s, x, tb), M + a * (-s) @ SIGMA)


# ---------------------------------------------------------------- ODE


@pytest.mark.parametrize("path_type,prediction", COMBOS)
def test_ode_follows_exact_flow_and_reaches_target(path_type, prediction):
    transport = create_transport(path_type, prediction)
    z = torch.randn(4000, 2, dtype=DT)
    fn = Sampler(transport).sample_ode(num_steps=5, atol=1e-9, rtol=1e-9)
    traj = fn(z, gaussian_model(transport))
    assert traj.shape == (5, 4000, 2) and fn.nfe > 0
    torch.testing.assert_close(traj[0], z)
    t0, t1 = transport.interval()
    torch.testing.assert_close(traj[-1], flow_map(transport, z, t0, t1), atol=1e-6, rtol=0)
    assert_moments(traj[-1])


@pytest.mark.parametrize("path_type,prediction", [("Linear", "velocity"), ("GVP", "score"), ("VP", "noise")])
def test_reverse_ode_inverts_forward(path_type, prediction):
    transport = create_transport(path_type, prediction)
    model, sampler = gaussian_model(transport), Sampler(transport)
    z = torch.randn(200, 2, dtype=DT)
    x = sampler.sample_ode(atol=1e-9, rtol=1e-9)(z, model)[-1]
    back = sampler.sample_ode(atol=1e-9, rtol=1e-9, reverse=True)(x, model)
    torch.testing.assert_close(back[0], x)
    torch.testing.assert_close(back[-1], z, atol=1e-6, rtol=0)


@pytest.mark.parametrize("path_type,prediction", [("Linear", "velocity"), ("VP", "score"), ("GVP", "noise")])
def test_euler_converges_to_dopri5_at_first_order(path_type, prediction):
    transport = create_transport(path_type, prediction)
    model, sampler = gaussian_model(transport), Sampler(transport)
    z = torch.randn(300, 2, dtype=DT)
    ref = sampler.sample_ode(atol=1e-10, rtol=1e-10)(z, model)[-1]
    errors = []
    for num_steps in (201, 401, 1001):
        fn = sampler.sample_ode(sampling_method="euler", num_steps=num_steps)
        errors.append((fn(z, model)[-1] - ref).abs().max().item())
        assert fn.nfe == num_steps - 1
    assert 1.9 < errors[0] / errors[1] < 2.1  # global error O(h)
    assert errors[2] < 5e-3


def test_fixed_step_progress_and_nfe():
    transport = create_transport()
    calls = []
    fn = Sampler(transport).sample_ode(
        sampling_method="rk4", num_steps=11, progress=lambda i, n: calls.append((i, n))
    )
    fn(torch.randn(8, 2, dtype=DT), gaussian_model(transport))
    assert calls == [(i, 10) for i in range(1, 11)]
    assert fn.nfe == 40
    with pytest.raises(ValueError, match="fixed-step"):
        Sampler(transport).sample_ode(progress=print)


# ---------------------------------------------------------------- SDE


@pytest.mark.parametrize("path_type,prediction", COMBOS)
def test_sde_reaches_target(path_type, prediction):
    transport = create_transport(path_type, prediction)
    # VP: sigma(0.96)^2 = 0.02, so the noise-free "Mean" last step from 0.96 shrinks the covariance by ~3 SE;
    # from 0.99 (sigma^2 = 0.002, like Linear at 0.96) it does not.
    last_step_size = 0.01 if path_type == "VP" else 0.04
    fn = Sampler(transport).sample_sde(last_step_size=last_step_size)
    traj = fn(torch.randn(4000, 2, dtype=DT), gaussian_model(transport))
    assert traj.shape == (250, 4000, 2) and fn.nfe == 250
    assert_moments(traj[-1])


@pytest.mark.parametrize("path_type,prediction", [("Linear", "velocity"), ("GVP", "score"), ("VP", "noise")])
def test_sde_heun_reaches_target(path_type, prediction):
    transport = create_transport(path_type, prediction)
    fn = Sampler(transport).sample_sde(sampling_method="Heun", last_step=None, num_steps=150)
    assert_moments(fn(torch.randn(4000, 2, dtype=DT), gaussian_model(transport))[-1])
    assert fn.nfe == 2 * 149


@pytest.mark.parametrize("diffusion_form", DIFFUSION_FORMS)
def test_sde_diffusion_forms_reach_target(diffusion_form):
    transport = create_transport()
    fn = Sampler(transport).sample_sde(diffusion_form=diffusion_form, diffusion_norm=1.5, last_step="Euler")
    assert_moments(fn(torch.randn(4000, 2, dtype=DT), gaussian_model(transport))[-1])


@pytest.mark.parametrize("last_step", [None, "Mean", "Tweedie", "Euler"])
def test_sde_last_steps_reach_target(last_step):
    transport = create_transport("GVP")
    calls = []
    fn = Sampler(transport).sample_sde(
        last_step=last_step, num_steps=200, progress=lambda i, n: calls.append(n)
    )
    traj = fn(torch.randn(4000, 2, dtype=DT), gaussian_model(transport))
    assert traj.shape[0] == 200 and len(calls) == 199 and set(calls) == {199}
    assert fn.nfe == 199 + (last_step is not None)
    assert_moments(traj[-1])


def test_sde_last_step_formulas():
    """Mean / Euler / Tweedie last steps from the state reached at t1 = 1 - h (h = 0.04)."""
    transport = create_transport("Linear", "score")
    model, h = gaussian_model(transport), 0.04
    z = torch.randn(16, 2, dtype=DT)
    t1 = torch.full((16,), 1 - h, dtype=DT)
    outs = {}
    for last_step in ("Mean", "Euler", "Tweedie"):
        torch.manual_seed(1)
        traj = Sampler(transport).sample_sde(last_step=last_step, last_step_size=h, num_steps=20)(z, model)
        outs[last_step] = (traj[-2], traj[-1])
    x = outs["Mean"][0]
    v, s, _ = exact_fields(transport, x, t1)
    g = (1 - t1[:, None]) / t1[:, None]  # SBDM diffusion of the Linear path
    torch.testing.assert_close(outs["Mean"][1], x + h * (v + g * s))
    torch.testing.assert_close(outs["Euler"][1], x + h * v)
    torch.testing.assert_close(outs["Tweedie"][1], (x + h**2 * s) / (1 - h))


def test_default_sde_is_finite_for_velocity_models():
    """SiT's velocity default (sample_eps = 0) started the SBDM SDE at t = 0, where w is infinite (NaN)."""
    transport = create_transport()
    x = Sampler(transport).sample_sde(num_steps=20)(torch.randn(64, 2, dtype=DT), gaussian_model(transport))
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------- likelihood


@pytest.mark.parametrize("path_type,prediction", COMBOS)
def test_ode_likelihood_matches_closed_form(path_type, prediction):
    transport = create_transport(path_type, prediction)
    x = data_samples(100)
    fn = Sampler(transport).sample_ode_likelihood(exact_divergence=True, atol=1e-9, rtol=1e-9)
    logp, z = fn(x, gaussian_model(transport))
    t0, t1 = transport.interval()
    torch.testing.assert_close(z, flow_map(transport, x, t1, t0), atol=1e-6, rtol=0)
    # exact change of variables over [t0, t1], with the N(0, I) prior in place of p_t0
    expected = (
        log_normal(x, *marginal(transport, t1))
        + transport.prior_logp(z)
        - log_normal(z, *marginal(transport, t0))
    )
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=0)
    # against the data density: exact where [t0, t1] = [0, 1] and p_0 = N(0, I); else off by the epsilons
    # and VP's alpha(0) = 0.0066 (at most 0.02 nats here)
    exact_ends = path_type != "VP" and prediction == "velocity"
    err = (logp - log_normal(x, M, SIGMA)).abs().max().item()
    assert err < (1e-6 if exact_ends else 0.03)


def test_hutchinson_likelihood_is_unbiased_and_averages_probes():
    transport = create_transport()
    x = data_samples(1).repeat(2000, 1)
    reference = log_normal(x[:1], M, SIGMA)
    stds = []
    for num_probes in (1, 16):
        fn = Sampler(transport).sample_ode_likelihood(num_probes=num_probes, atol=1e-8, rtol=1e-8)
        logp, _ = fn(x, gaussian_model(transport))
        se = logp.std() / math.sqrt(len(logp))
        assert abs(logp.mean() - reference).item() < Z_SE * se.item()
        stds.append(logp.std().item())
    assert stds[0] > 0.1
    assert 0.2 < stds[1] / stds[0] < 0.3  # 16 independent probes: std / 4


# ---------------------------------------------------------------- training loss


def _loss(transport, model, x1, seed):
    torch.manual_seed(seed)
    return transport.training_losses(model, x1)["loss"]


CONFIGS = [(p, q, None) for p, q in COMBOS] + [
    (p, q, w) for p in ("Linear", "GVP", "VP") for q in ("score", "noise") for w in ("velocity", "likelihood")
]


@pytest.mark.parametrize("path_type,prediction,loss_weight", CONFIGS)
def test_training_loss_is_minimal_at_exact_field(path_type, prediction, loss_weight):
    """L(eps) for f* + eps is exactly quadratic; its slope at 0 vanishes within sampling error for f* only.

    f* minimises the loss at every t, so the slope is tested per unit weight (the weights, checked
    below, are positive but heavy-tailed near t = 0 and 1, which would swamp the standard error).
    """
    transport = create_transport(path_type, prediction, loss_weight)
    x1, delta = data_samples(20000), 0.5  # any delta gives the exact slope of a quadratic
    times = {}

    def perturbed(field, eps):
        def model(x, t):
            times["t"] = t
            return field(x, t) + eps

        return model

    def slope_and_loss(field):
        losses = [_loss(transport, perturbed(field, e), x1, seed=3) for e in (-delta, 0.0, delta)]
        weight = transport.loss_weight_fn(times["t"])
        b = (losses[2] - losses[0]) / (2 * delta) / weight  # per-sample dL/d eps at 0, per unit weight
        return b.mean().item(), (b.std() / math.sqrt(len(b))).item(), [loss.mean().item() for loss in losses]

    slope, se, losses = slope_and_loss(gaussian_model(transport))
    assert abs(slope) < Z_SE * se
    assert losses[1] < min(losses[0], losses[2])
    wrong_slope, wrong_se, _ = slope_and_loss(gaussian_model(transport, mean=M + 0.3))
    assert abs(wrong_slope) > Z_SE * wrong_se  # the check has power


@pytest.mark.parametrize("path_type,prediction,loss_weight", CONFIGS)
def test_training_loss_targets_weights_and_times(path_type, prediction, loss_weight):
    transport = create_transport(path_type, prediction, loss_weight)
    seen = {}

    def zero_model(x, t, label):
        assert label == "y" and t.shape == (x.shape[0],)
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    x1 = data_samples(512)
    out = transport.training_losses(zero_model, x1, {"label": "y"})
    assert out["loss"].shape == (512,) and out["pred"].shape == x1.shape
    t = seen["t"]
    t0, t1 = transport.interval(train=True)
    assert t.min() >= t0 and t.max() <= t1 and t.max() - t.min() > 0.9 * (t1 - t0)
    a, da, s, ds = coeffs(transport, t[:, None])
    noise = (seen["x"] - a * x1) / s
    if prediction == "velocity":
        expected = ((da * x1 + ds * noise) ** 2).mean(1)
    else:
        g = transport.path.drift_var(t[:, None])  # checked in closed form above
        weight = {None: 1.0, "velocity": (g / s) ** 2, "likelihood": g / s**2}[loss_weight]
        expected = (weight * noise**2).mean(1)  # zero prediction: error = -noise (noise) or +noise (score)
    torch.testing.assert_close(out["loss"], expected)


def test_training_loss_uses_first_channels_of_learn_sigma_output():
    transport = create_transport()
    x1 = torch.randn(8, 4, 3, 3, dtype=DT)

    def model(x, t):
        return torch.cat([x * 0.5, torch.full_like(x, 1e6)], dim=1)  # 2C channels: prediction, variance

    wide = _loss(transport, model, x1, seed=5)
    narrow = _loss(transport, lambda x, t: x * 0.5, x1, seed=5)
    torch.testing.assert_close(wide, narrow)
    with pytest.raises(ValueError, match="does not fit"):
        transport.training_losses(lambda x, t: x[:, :2], x1)


# ---------------------------------------------------------------- options and defaults


def test_eps_defaults_and_intervals():
    expected = {
        ("Linear", "velocity"): (0.0, 0.0),
        ("GVP", "velocity"): (0.0, 0.0),
        ("Linear", "score"): (1e-3, 1e-3),
        ("GVP", "noise"): (1e-3, 1e-3),
        ("VP", "velocity"): (1e-5, 1e-3),
        ("VP", "noise"): (1e-5, 1e-3),
    }
    for (path_type, prediction), eps in expected.items():
        transport = create_transport(path_type, prediction)
        assert (transport.train_eps, transport.sample_eps) == eps
    assert create_transport("VP", train_eps=1e-4).sample_eps == 1e-3  # SiT left this None and crashed
    assert create_transport("Linear", "score", train_eps=1e-2).sample_eps == 1e-3
    assert create_transport(sample_eps=0.01).sample_eps == 0.01

    linear, score, vp = create_transport(), create_transport("Linear", "score"), create_transport("VP")
    assert linear.interval() == (0.0, 1.0) and linear.interval(train=True) == (0.0, 1.0)
    assert linear.interval(sde=True, last_step_size=0.04) == (1e-3, 0.96)
    assert linear.interval(sde=True, diffusion_form="sigma", last_step_size=0.04) == (0.0, 0.96)
    assert score.interval() == (1e-3, 1 - 1e-3) and score.interval(train=True) == (1e-3, 1 - 1e-3)
    assert vp.interval() == (0.0, 1 - 1e-3) and vp.interval(train=True) == (0.0, 1 - 1e-5)
    assert vp.interval(sde=True, last_step_size=0.04) == (0.0, 0.96)


def test_bad_names_raise_one_clear_line():
    sampler = Sampler(create_transport())
    cases = [
        (lambda: create_transport("linear"), "path_type 'linear'; valid options: 'Linear', 'GVP', 'VP'"),
        (lambda: create_transport(prediction="eps"), "prediction 'eps'; valid options: 'velocity'"),
        (lambda: create_transport("VP", "score", "snr"), "loss_weight 'snr'; valid options: None"),
        (
            lambda: sampler.sample_ode(sampling_method="Euler"),
            "sampling_method 'Euler'; valid options: 'dopri8'",
        ),
        (
            lambda: sampler.sample_sde(sampling_method="euler"),
            "sampling_method 'euler'; valid options: 'Euler'",
        ),
        (
            lambda: sampler.sample_sde(diffusion_form="sbdm"),
            "diffusion_form 'sbdm'; valid options: 'constant'",
        ),
        (lambda: sampler.sample_sde(last_step="mean"), "last_step 'mean'; valid options: None, 'Mean'"),
        (lambda: create_transport(loss_weight="velocity"), "score/noise predictions only"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
            make()
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- guidance with a sampler


def test_cfg_with_sampler_extrapolates_gaussian_means():
    """Gaussian fields are linear in the mean, so CFG at scale s samples N(m_u + s (m_c - m_u), SIGMA)."""
    transport = create_transport("GVP")
    means = torch.tensor([[2.0, 0.0], [0.0, -1.0], [0.3, 0.2]], dtype=DT)  # classes 0, 1; null = 2

    def model(x, t, y):
        return exact_fields(transport, x, t, mean=means[y])[0]

    guided = CFGModel(model, scale=2.5, num_classes=2)
    z = torch.randn(64, 2, dtype=DT)
    y = torch.randint(0, 2, (64,))
    x = Sampler(transport).sample_ode(atol=1e-9, rtol=1e-9)(z, guided, y=y)[-1]
    target = means[2] + 2.5 * (means[y] - means[2])
    want = torch.stack([flow_map(transport, z[i : i + 1], 0.0, 1.0, mean=target[i]) for i in range(64)])[:, 0]
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
    x1 = Sampler(transport).sample_ode(atol=1e-9, rtol=1e-9)(
        z, CFGModel(model, scale=1.0, num_classes=2), y=y
    )
    x2 = Sampler(transport).sample_ode(atol=1e-9, rtol=1e-9)(z, model, y=y)
    torch.testing.assert_close(x1, x2, atol=0, rtol=0)


@pytest.mark.parametrize("method", ODE_METHODS)
def test_every_listed_ode_method_is_a_torchdiffeq_method(method):
    """Our method table uses torchdiffeq's public names: each one integrates dx/dt = -x to e^-1."""
    from torchdiffeq import odeint

    from sit_atconv.transport import ADAPTIVE_ODE_METHODS

    ts = torch.linspace(0.0, 1.0, 65, dtype=torch.float64)
    options = {"step_t": ts[-1:]} if method in ADAPTIVE_ODE_METHODS else None
    x1 = odeint(lambda t, x: -x, torch.ones(2, dtype=torch.float64), ts, method=method, options=options)[-1]
    assert torch.allclose(x1, torch.full((2,), math.exp(-1.0), dtype=torch.float64), atol=1e-2)

"""Interpolant transport (SiT): paths, training objective and time distribution, ODE/SDE samplers, CFG.

Convention: t = 0 is noise, t = 1 is data, x_t = alpha(t) x_data + sigma(t) noise.
"""

from .guidance import CFGModel, cfg_combine
from .objective import LOSS_WEIGHTS, PREDICTIONS, Transport, create_transport, default_eps
from .paths import PATHS, GVPPath, LinearPath, Path, VPPath, expand_t
from .solvers import (
    ADAPTIVE_ODE_METHODS,
    DIFFUSION_FORMS,
    FIXED_STEP_ODE_METHODS,
    LAST_STEPS,
    ODE_METHODS,
    SDE_METHODS,
    Sampler,
    diffusion_coefficient,
    integrate_ode,
    integrate_sde,
)
from .timesteps import TIME_SAMPLINGS, TimeSampling, shift_time, unshift_time

__all__ = [
    "ADAPTIVE_ODE_METHODS",
    "CFGModel",
    "DIFFUSION_FORMS",
    "FIXED_STEP_ODE_METHODS",
    "GVPPath",
    "LAST_STEPS",
    "LOSS_WEIGHTS",
    "LinearPath",
    "ODE_METHODS",
    "PATHS",
    "PREDICTIONS",
    "Path",
    "SDE_METHODS",
    "Sampler",
    "TIME_SAMPLINGS",
    "TimeSampling",
    "Transport",
    "VPPath",
    "cfg_combine",
    "create_transport",
    "default_eps",
    "diffusion_coefficient",
    "expand_t",
    "integrate_ode",
    "integrate_sde",
    "shift_time",
    "unshift_time",
]

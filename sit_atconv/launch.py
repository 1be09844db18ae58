"""This process's place in an `accelerate launch` (or a plain run), for jobs that need no Accelerator."""

from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def process_state() -> PartialState:
    """The launch's PartialState; honours ACCELERATE_USE_CPU, which a bare PartialState() ignores."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))

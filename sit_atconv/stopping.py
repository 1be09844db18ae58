"""Stop at a safe point on SIGTERM / SIGINT / a pre-warning signal: long jobs (training, sample generation,
latent extraction) finish the unit of work in hand, keep what is written, and say how to continue."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = ("SIGTERM", "SIGINT")


class StopSignals:
    """Within `with`, SIGTERM, SIGINT and `extra` (e.g. SLURM's pre-warning SIGUSR1) only raise a flag:
    the work in hand finishes, is kept, and the job stops. The previous handlers come back afterwards
    (outside the main thread, where Python cannot set handlers, nothing changes)."""

    def __init__(self, extra: str | None = None):
        self.names = STOP_SIGNALS + ((extra,) if extra and extra not in STOP_SIGNALS else ())
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            return self
        for name in self.names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        self.received = self.received or signal.Signals(number).name

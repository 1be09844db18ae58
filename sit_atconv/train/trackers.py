"""Metric logging on the main process: a JSONL log always, plus TensorBoard and/or wandb.

wandb never hangs: its mode is decided before `wandb.init` — `WANDB_MODE` if set, else online
only with an API key *and* a reachable server, else offline (files in the run folder).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..io import write_text_atomic

TRACKERS = ("wandb", "tensorboard")


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> str:
    """'disabled' | 'offline' | 'online', decided without ever prompting."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if _wandb_has_key() and _reachable("api.wandb.ai"):
        return "online"
    return "offline"


def drop_lines_after(path: Path, step: int) -> None:
    """Remove JSONL records of steps past `step` (logged after the checkpoint a resumed run continues from),
    so the log has no duplicate steps."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


class Tracker:
    """Fan-out logger: `log(metrics, step)` writes JSONL and forwards to the enabled backends."""

    def __init__(self, run_dir: str | Path, trackers: list[str], config: dict, project: str = "sit_atconv",
                 run_name: str | None = None, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = self._wandb = None
        self._file = None
        if not enabled:
            return
        if resume_step is not None:
            drop_lines_after(self.run_dir / "metrics.jsonl", resume_step)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "wandb" in trackers:
            mode = wandb_mode()
            if mode != "disabled":
                import wandb

                os.environ.setdefault("WANDB_DIR", str(self.run_dir))
                self._wandb = wandb.init(project=project, name=run_name or self.run_dir.name, config=config,
                                         dir=str(self.run_dir), mode=mode, resume="allow",
                                         id=self.run_dir.name.replace("/", "-"))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

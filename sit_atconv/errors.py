"""The one user-error type: bad input that every CLI prints as one line (`error: ...`, exit status 2).

Raise a `UserError` (or a subclass) whenever the fix is the user's: a wrong flag, a missing file, a
run folder that cannot be used as asked. The message is one line naming the problem and the fix.
Everything else is a bug and keeps its traceback. Subclasses that replace a builtin error also derive
from it, so callers that caught `ValueError` keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input; the message is one line naming the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration or command line the run cannot start with."""


class DataError(UserError, ValueError):
    """A data problem: missing folder, unreadable file, mismatched latent store."""


class CheckpointError(UserError):
    """A checkpoint path that does not resolve, or a file that is not what it should be."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would need to run arbitrary code to load."""


class RunError(UserError):
    """A run folder that cannot be used as asked (would overwrite work, different model)."""


class GenerationError(UserError, ValueError):
    """Sample generation cannot start or finish as asked."""


class MetricInputError(UserError, ValueError):
    """An image set, reference or statistics file the metrics cannot use."""

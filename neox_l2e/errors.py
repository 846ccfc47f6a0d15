"""The project's error hierarchy: every problem a user can fix is a ``NeoXL2EError`` whose message is one line
naming the file / key and what to do; the command-line tools print it as ``error: ...`` and exit non-zero.

    NeoXL2EError
      ConfigError       a bad config key or value (also a ValueError)
      DataError         a dataset or tokenizer file (also a ValueError)
      InteropError      a Hugging Face folder that cannot be converted (also a ValueError)
      AnalysisError     an analysis input (also a ValueError)
      LaunchError       the launcher's environment (may concern some ranks only; also a RuntimeError)
      CheckpointError   a checkpoint that cannot be read, trusted or written (also a RuntimeError)
        ReshardError    a checkpoint the resharding tool cannot convert
      TrainingError     training cannot go on (also a RuntimeError)

The second base says the kind: bad input (ValueError) or a state of the run / the files (RuntimeError), so
code that catches the builtin kinds keeps working.
"""

from __future__ import annotations


class NeoXL2EError(Exception):
    """A problem a user can fix: the message is one line."""


class ConfigError(NeoXL2EError, ValueError):
    """A bad config: the message is one line naming the file, the key and what to do."""


class DataError(NeoXL2EError, ValueError):
    """A data or tokenizer problem a user can fix: always one line naming the file and the problem.

    Raised before training starts (on open / build), never followed by exit() in library code.
    """


class InteropError(NeoXL2EError, ValueError):
    """A Hugging Face directory or checkpoint that cannot be converted: one line naming the file and problem."""


class AnalysisError(NeoXL2EError, ValueError):
    """A user-facing problem (missing file, bad jsonl line, unknown checkpoint layout): one line."""


class LaunchError(NeoXL2EError, RuntimeError):
    """The launcher's environment cannot start this rank (one line; may concern some ranks only)."""


class CheckpointError(NeoXL2EError, RuntimeError):
    """A checkpoint that cannot be read, trusted or written: one line naming the path and the problem."""


class ReshardError(CheckpointError):
    """A checkpoint the resharding tool cannot convert (one line)."""


class TrainingError(NeoXL2EError, RuntimeError):
    """Training cannot go on (too many bad steps, non-finite weights, ...): one line for the user."""

"""The error hierarchy every stage raises; the CLI turns these into one-line messages and exit codes."""

from __future__ import annotations

from typing import Any


class ModelshipError(Exception):
    """A problem the user can fix: bad input, a missing file, a wrong flag. Exit code 2, no traceback."""

    exit_code = 2


class ConfigError(ModelshipError):
    """A configuration value is out of range or inconsistent."""


class DataError(ModelshipError):
    """A dataset is missing, empty or unreadable."""


class ModelError(ModelshipError):
    """A model name, factory or its kwargs cannot build the network asked for."""


class CheckpointError(ModelshipError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model."""


class BundleError(ModelshipError):
    """A bundle is missing, malformed, of an unknown version, or its artifacts do not match their hashes."""


class ArtifactError(BundleError):
    """A bundle's artifact cannot be opened by its runtime: not a file of its kind, or refused when loaded.

    `detail` says which artifact and what is wrong without the folder it lies in (what a server may tell a client);
    the message adds the folder."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


class ExportError(ModelshipError):
    """The model could not be exported to a requested format. Exit code 1: the gate refused the model."""

    exit_code = 1


class GateError(ModelshipError):
    """The work ran but its result must not ship (accuracy under the bar, parity failed). Exit code 1.

    `result` is what was built (a RunResult from the pipeline), so a caller can still show it.
    """

    exit_code = 1

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


class ParityError(GateError):
    """An exported artifact disagrees with eager PyTorch beyond its tolerance or accuracy gate. Exit code 1."""


class ClientError(ModelshipError):
    """A server refused a client's request (4xx, exit code 2) or could not be reached or failed (exit code 1)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
        self.exit_code = 2 if status is not None and 400 <= status < 500 else 1

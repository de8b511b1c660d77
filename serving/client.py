"""Deprecated: the client is `modelship.client` (it installs without the server). This name goes in the next release."""

import warnings

from modelship.client import Client
from modelship.errors import ClientError

__all__ = ["Client", "ClientError"]

warnings.warn(
    "modelship.serving.client is deprecated and goes in the next release; import modelship.client",
    DeprecationWarning,
    stacklevel=2,
)

"""The public Python client: `from specdec.client import SpecdClient` (it lives in specdec.wire.client)."""

from specdec.wire.client import Completion, SpecdClient

__all__ = ["Completion", "SpecdClient"]

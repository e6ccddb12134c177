"""The Batch API: batches of requests run on the `batch` tier, below flex."""

from flexserve.batches.service import Batches

__all__ = ["Batches"]

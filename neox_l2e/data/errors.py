"""The one exception type of the data pipeline (defined with the project's others in neox_l2e.errors)."""

from ..errors import DataError

__all__ = ["DataError"]

"""The mathematics: integral probability metrics between point clouds, independent of condensation."""

from .witness import Witness

__all__ = ["Witness"]

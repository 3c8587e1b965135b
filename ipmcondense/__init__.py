"""ipmcondense: dataset condensation and distances between datasets as integral probability metrics.

The distances of :mod:`ipmcondense.ipm` are re-exported here (``ipmcondense.mmd(x, y)``), together
with the two entry points of the condensation engine, :func:`condense` and :func:`evaluate`.
"""

from ._version import __version__  # noqa: E402

from .ipm import *  # noqa: E402,F401,F403  (the public distances, listed in ipm.__all__)
from .ipm import __all__ as _ipm_all  # noqa: E402
from .condensation.api import CondensationResult, condense, evaluate  # noqa: E402

__all__ = ["__version__", *_ipm_all, "condense", "evaluate", "CondensationResult"]

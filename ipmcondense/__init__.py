"""ipmcondense: dataset condensation and distances between datasets as integral probability metrics."""

__version__ = "0.1.0"

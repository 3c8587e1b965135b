"""The benchmark grid behind ``benchmarks/condense.py``: :mod:`.profiles`, the budget profiles read
from ``benchmarks/profiles.toml``. ``benchmarks/condense.py`` imports this folder as the top-level
package ``grid`` (it puts its own folder on ``sys.path``, where a script's folder already is).
"""

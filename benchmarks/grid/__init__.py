"""The benchmark grid behind ``benchmarks/condense.py``, in four parts.

* :mod:`.profiles`: the budget profiles, read from ``benchmarks/profiles.toml``;
* :mod:`.cells`: what a cell is, where its JSON lives, its key and the cache check;
* :mod:`.plan`: the cells of a grid and their rough cost;
* :mod:`.runner`: running cells in child processes, the grid loop, the environment record;

and :mod:`.class_batching`, the class-batching timing (``--class-batching``). ``benchmarks/condense.py``
is the command line and imports this folder as the top-level package ``grid`` (it puts its own folder
on ``sys.path``, where a script's folder already is).
"""

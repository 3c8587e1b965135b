"""The condensation engine: synthetic sets, samplers, discrepancies, the one loop and the recipe table.

Every method is a row of :data:`ipmcondense.condensation.recipes.RECIPES` (feature map x discrepancy x
parameter sampler); :func:`ipmcondense.condensation.api.condense` runs any row, or any new combination of
axes, through :class:`ipmcondense.condensation.engine.CondensationEngine`.
"""

from .api import CondensationResult, condense, evaluate
from .discrepancies import DISCREPANCY_NAMES, Discrepancy, get_discrepancy
from .engine import CondensationEngine, matching_loss, siamese_augment
from .recipes import METHOD_NAMES, RECIPES, Recipe, compose_recipe, get_recipe, resolve_config
from .samplers import SAMPLER_NAMES, ParameterSampler, get_sampler
from .synthetic import PixelSet, SyntheticSet

__all__ = [
    "condense",
    "evaluate",
    "CondensationResult",
    "Recipe",
    "RECIPES",
    "METHOD_NAMES",
    "get_recipe",
    "compose_recipe",
    "resolve_config",
    "CondensationEngine",
    "matching_loss",
    "siamese_augment",
    "SyntheticSet",
    "PixelSet",
    "Discrepancy",
    "DISCREPANCY_NAMES",
    "get_discrepancy",
    "ParameterSampler",
    "SAMPLER_NAMES",
    "get_sampler",
]

"""ipmcondense.components: options dataclasses, registries, and the flat hyperparameter table derived from them."""

from dataclasses import dataclass

import pytest

from ipmcondense.components import Component, Registry, option, option_sources


class _Thing(Component):
    kind = "thing"
    name = "thing"

    @dataclass(frozen=True)
    class Options:
        size: int = option(3, "a paper, table 1")
        scale: float = option(0.5)

    def __init__(self, size: int, scale: float) -> None:
        self.size, self.scale = size, scale


class _Other(Component):
    kind = "thing"
    name = "other"

    @dataclass(frozen=True)
    class Options:
        size: int = option(4)


def test_from_config_picks_its_options_and_defaults_the_rest():
    thing = _Thing.from_config({"size": 7, "unrelated": 1})
    assert (thing.size, thing.scale) == (7, 0.5)
    assert _Thing.option_defaults() == {"size": 3, "scale": 0.5}
    assert option_sources(_Thing.Options) == {"size": "a paper, table 1", "scale": ""}


def test_registry_lists_choices_and_rejects_unknown_or_duplicate_names():
    registry = Registry("thing")
    registry.register(_Thing)
    assert registry.names == ("thing",) and registry["thing"] is _Thing and list(registry) == ["thing"]
    with pytest.raises(ValueError, match="unknown thing 'nope'; expected one of: 'thing'"):
        registry.get("nope")

    class _Clash(_Thing):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        registry.register(_Clash)


def test_one_flat_option_cannot_have_two_defaults():
    registry = Registry("thing")
    registry.register(_Thing)
    registry.register(_Other)
    with pytest.raises(ValueError, match="option 'size' has default 3 in thing 'thing' and 4 in 'other'"):
        registry.option_defaults()

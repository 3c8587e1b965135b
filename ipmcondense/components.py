"""Typed, swappable components: a name, a frozen options dataclass, and a registry per kind.

Every axis of a condensation recipe (feature map, discrepancy, parameter sampler, extra term,
synthetic-set parameterisation, real-batch selector, objective) is a small class that declares

* ``name``: its registry key (what a recipe row and the command line say);
* ``Options``: a frozen dataclass of its hyperparameters, each with its default and the source of
  that default (:func:`option`);
* ``from_options(options, **context)``: how to build it.

The flat hyperparameter table of the engine (``COMMON_DEFAULTS``) is *derived* from these dataclasses
(:meth:`Registry.option_defaults`), so a new component brings its options with it and nothing else has
to list them. A :class:`Registry` maps names to classes and gives a clear error listing the choices
for an unknown name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

from ipmcondense.ipm._validation import check_choice

__all__ = ["option", "NoOptions", "Component", "Registry", "option_sources"]


def option(default: Any, source: str = "") -> Any:
    """A field of an ``Options`` dataclass: its default and where that default comes from."""
    return dataclasses.field(default=default, metadata={"source": source})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a component that has none."""


class Component:
    """Base of every registered component: ``name``, ``Options`` and :meth:`from_options`."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """``{option name: default}`` of :attr:`Options`."""
        return {f.name: f.default for f in dataclasses.fields(cls.Options)}

    @classmethod
    def options_from(cls, config: Mapping[str, Any]) -> Any:
        """:attr:`Options` filled from a flat hyperparameter mapping (missing keys: the defaults)."""
        values = {f.name: config[f.name] for f in dataclasses.fields(cls.Options) if f.name in config}
        return cls.Options(**values)

    @classmethod
    def from_options(cls, options: Any, **context: Any) -> Component:
        """Build the component (default: the options are the constructor's keyword arguments)."""
        return cls(**dataclasses.asdict(options))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **context: Any) -> Component:
        """:meth:`from_options` of :meth:`options_from` ``config``."""
        return cls.from_options(cls.options_from(config), **context)


_C = TypeVar("_C", bound=type)


class Registry(Mapping[str, Any], Generic[_C]):
    """Name -> component class for one kind (``"feature map"``, ``"sampler"``, ...).

    ``registry.register`` is a class decorator; ``registry.get(name)`` raises ``ValueError`` naming
    the kind and listing the choices for an unknown name.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, Any] = {}

    def register(self, cls: _C) -> _C:
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"a {self.kind} class needs a name, {cls.__qualname__} has none")
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._classes[name] = cls
        return cls

    def get(self, name: Any, default: Any = None) -> Any:  # type: ignore[override]
        """The class registered as ``name``; an unknown name raises ``ValueError`` listing the choices."""
        check_choice(name, tuple(self._classes), self.kind)
        return self._classes[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def option_defaults(self) -> dict[str, Any]:
        """The union of every registered class's option defaults; a name shared by two classes must
        have the same default in both."""
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for name, cls in self._classes.items():
            for key, value in cls.option_defaults().items():
                if key in merged and merged[key] != value:
                    raise ValueError(
                        f"option {key!r} has default {merged[key]!r} in {self.kind} {owner[key]!r} and "
                        f"{value!r} in {name!r}: one flat hyperparameter cannot have two defaults"
                    )
                merged.setdefault(key, value)
                owner.setdefault(key, name)
        return merged


def option_sources(options_class: type) -> dict[str, str]:
    """``{option name: source of its default}`` of an ``Options`` dataclass."""
    return {f.name: f.metadata.get("source", "") for f in dataclasses.fields(options_class)}

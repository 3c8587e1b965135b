"""The evaluation protocol behind each method's published numbers, selectable by name.

The library evaluates every condensed set with one protocol by default (``"standard"``: the VICO-UoE
protocol of DC/DSA/DM, :class:`~ipmcondense.evaluation.EvaluationProtocol` with its defaults). Several
papers published their numbers under another protocol, and a number is only comparable with one
measured the same way. :data:`PUBLISHED_PROTOCOLS` records, per registry row, the
:class:`~ipmcondense.evaluation.EvaluationProtocol` settings of its paper's evaluation (read from the
official code, ``shared/reference/methods.md`` section 3), and what of it the library cannot reproduce.

:func:`protocol_settings` turns a protocol name into those settings::

    protocol_settings("dc", "cifar10", "published")   # {"augmentation": "none", "epochs": 300}
    protocol_settings("dc", "cifar10", "standard")    # {}

``ipmcondense evaluate RUN --protocol published`` (Python: ``evaluate(run, protocol="published")``)
applies them; a row whose paper evaluated in a way the protocol object cannot express (other
networks, optimisers or losses) raises ``ValueError`` saying why. Settings that belong to the run
rather than the evaluation (ZCA whitening, the learned learning rate of MTT, learned soft labels) come
from the condensed set itself under both protocols.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from ipmcondense.evaluation import EvaluationProtocol
from ipmcondense.ipm._validation import check_choice

__all__ = [
    "PROTOCOL_NAMES",
    "PublishedProtocol",
    "PUBLISHED_PROTOCOLS",
    "published_protocol",
    "protocol_settings",
    "is_standard_protocol",
]

#: The names :func:`protocol_settings` accepts.
PROTOCOL_NAMES = ("standard", "published")
_PROTOCOL_FIELDS = frozenset(f.name for f in fields(EvaluationProtocol))


@dataclass(frozen=True)
class PublishedProtocol:
    """How one method's paper evaluated its condensed sets.

    Attributes:
        source: where the protocol was read (official code, file and lines).
        settings: :class:`~ipmcondense.evaluation.EvaluationProtocol` fields for every dataset
            (empty: the standard protocol).
        per_dataset: ``{dataset: settings}`` replacing ``settings`` for that dataset.
        deviations: what of the paper's evaluation the library does not reproduce ("" if nothing).
        unavailable: why the paper's evaluation cannot be expressed at all ("" when it can); such a
            row has no published protocol to select.
    """

    source: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    per_dataset: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    deviations: str = ""
    unavailable: str = ""

    def __post_init__(self) -> None:
        for where, row in (("settings", self.settings), *((f"per_dataset[{d!r}]", r) for d, r in self.per_dataset.items())):
            unknown = sorted(set(row) - _PROTOCOL_FIELDS)
            if unknown:
                raise ValueError(f"{where} names unknown EvaluationProtocol field(s) {unknown}")
            EvaluationProtocol(**row)  # validates the values
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "per_dataset", MappingProxyType({d: MappingProxyType(dict(r))
                                                                   for d, r in self.per_dataset.items()}))

    def for_dataset(self, dataset: str) -> dict[str, Any]:
        """The protocol settings for ``dataset`` (``ValueError`` if the protocol is unavailable)."""
        if self.unavailable:
            raise ValueError(self.unavailable)
        return dict(self.per_dataset.get(dataset, self.settings))


_VICO = "VICO-UoE/DatasetCondensation utils.py evaluate_synset (the standard protocol itself)"
_UNAVAILABLE = "its published numbers were measured with {what}, which EvaluationProtocol cannot express"

#: Per registry row, the protocol of its paper's numbers. A row not listed has no recorded protocol.
PUBLISHED_PROTOCOLS: Mapping[str, PublishedProtocol] = MappingProxyType({
    "dc": PublishedProtocol(
        source="VICO-UoE/DatasetCondensation main.py (DC without DSA): get_daparam sets DC augmentation "
               "'crop_scale_rotate' for MNIST only, and epoch_eval_train = 1000 with augmentation, 300 without",
        settings={"augmentation": "none", "epochs": 300},
        per_dataset={"mnist": {"augmentation": "dsa", "epochs": 1000}},
        deviations="MNIST: DC's own augmentation (per-image crop 4 px, scale 0.2, rotate 45 deg, one drawn per "
                   "image) is replaced by per-sample DSA"),
    "dsa": PublishedProtocol(source=_VICO + ", DSA per sample, 1000 epochs"),
    "dm": PublishedProtocol(source="VICO-UoE/DatasetCondensation main_DM.py: " + _VICO),
    "idm": PublishedProtocol(source="uitrbn/IDM: the VICO evaluate_synset, 1000 epochs with DSA"),
    "cafe": PublishedProtocol(
        source="kaiwang960112/CAFE: the VICO evaluate_synset; the row uses DSA, so the CAFE+DSA numbers (1000 "
               "epochs with DSA)"),
    "datadam": PublishedProtocol(
        source="DataDistillation/DataDAM utils.py evaluate_synset: 1800 epochs, batch 64, SGD(0.01, 0.9, 5e-4), "
               "x0.1 at half, DSA",
        settings={"epochs": 1800, "batch_size": 64}),
    "mtt": PublishedProtocol(
        source="GeorgeCazenavette/mtt-distillation utils.py evaluate_synset: the VICO protocol with the learned "
               "learning rate (taken from the set) and ZCA inputs where the run whitened (taken from its config)",
        deviations="MTT reports the best accuracy over the evaluations made during distillation (issue #23); the "
                   "library evaluates the final set"),
    "idc": PublishedProtocol(
        source="snu-mllab/Efficient-Dataset-Condensation test.py/train.py: 300 epochs, batch 64, SGD(0.01, 0.9, "
               "5e-4), DSA + CutMix",
        settings={"epochs": 300, "batch_size": 64},
        deviations="IDC decays the rate by 0.2 at 2/3 and 5/6 of training (MultiStepLR) and adds CutMix (p 0.5); "
                   "the library keeps one x0.1 decay at half and DSA alone"),
    "kip": PublishedProtocol(
        source="KIP NeurIPS'21 Table 2 (KIP -> NN)",
        unavailable=_UNAVAILABLE.format(what="a width-1024 ConvNet without normalisation trained with MSE or "
                                              "cross-entropy on learned labels, per-setting hyperparameters")),
    "rfad": PublishedProtocol(
        source="yolky/RFAD eval_distilled_set.py --use_best_hypers",
        unavailable=_UNAVAILABLE.format(what="per-setting tuned lr, weight decay, label scale and centring "
                                              "(get_best_finite_hypers) on learned labels")),
    "rcig": PublishedProtocol(
        source="yolky/RCIG eval.py",
        unavailable=_UNAVAILABLE.format(what="a ConvNet without normalisation, Adam 1e-4 with warm-up and cosine "
                                              "decay, a flip-doubled set and learned labels")),
    "dd": PublishedProtocol(
        source="ssnl/dataset-distillation (DC paper Table 1 quotes it)",
        unavailable=_UNAVAILABLE.format(what="LeNet (MNIST) / AlexCifarNet (CIFAR-10) trained by replaying the "
                                              "learned step sizes, not ConvNet-3")),
})


def published_protocol(method: str) -> PublishedProtocol | None:
    """The :class:`PublishedProtocol` of a registry row (by its base name, before any ``+`` composition)."""
    return PUBLISHED_PROTOCOLS.get(str(method).split("+", 1)[0])


def protocol_settings(method: str, dataset: str, protocol: str = "standard") -> dict[str, Any]:
    """:class:`~ipmcondense.evaluation.EvaluationProtocol` settings of the protocol named ``protocol``.

    ``"standard"``: ``{}`` (the VICO-UoE protocol for every method). ``"published"``: the settings of
    ``method``'s paper on ``dataset`` (:data:`PUBLISHED_PROTOCOLS`).

    Raises:
        ValueError: an unknown protocol name; ``"published"`` for a method without a recorded protocol, or
            one whose paper's evaluation the protocol object cannot express (the message says why).
    """
    check_choice(protocol, PROTOCOL_NAMES, "protocol")
    if protocol == "standard":
        return {}
    row = published_protocol(method)
    if row is None:
        raise ValueError(
            f"method {method!r} has no recorded published evaluation protocol (methods with one: "
            f"{', '.join(m for m, p in PUBLISHED_PROTOCOLS.items() if not p.unavailable)}); use protocol 'standard'"
        )
    try:
        return row.for_dataset(dataset)
    except ValueError as err:
        raise ValueError(f"method {method!r} has no published protocol to select: {err} ({row.source})") from None


def is_standard_protocol(settings: Mapping[str, Any]) -> bool:
    """Whether ``settings`` train exactly as the standard protocol does (e.g. ``{"epochs": 1000}`` with DSA)."""
    def resolved(protocol: EvaluationProtocol) -> dict[str, Any]:
        out = protocol.to_dict()
        out["epochs"] = protocol.total_epochs
        return out

    return resolved(EvaluationProtocol(**settings)) == resolved(EvaluationProtocol())

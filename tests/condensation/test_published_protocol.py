"""Evaluation per method: the protocol of each paper's published numbers, selectable by name (issue 11 item 12)."""

import json

import pytest

from ipmcondense.cli import main
from ipmcondense.condensation.api import condense, evaluate
from ipmcondense.condensation.published import (
    PUBLISHED_PROTOCOLS,
    PublishedProtocol,
    is_standard_protocol,
    protocol_settings,
)
from ipmcondense.condensation.recipes import METHOD_NAMES
from ipmcondense.evaluation import EvaluationProtocol


def test_dc_published_protocol_is_the_reference_code_s():
    # VICO main.py: DC without DSA evaluates CIFAR without augmentation for 300 epochs, MNIST with (DC's) augmentation
    # for 1000; everything else of the protocol is the standard one
    for dataset in ("cifar10", "cifar100", "fashion-mnist", "digits"):
        assert protocol_settings("dc", dataset, "published") == {"augmentation": "none", "epochs": 300}
    assert protocol_settings("dc", "mnist", "published") == {"augmentation": "dsa", "epochs": 1000}
    protocol = EvaluationProtocol(**protocol_settings("dc", "cifar10", "published"))
    assert protocol.total_epochs == 300 and protocol.augmentation == "none" and protocol.lr == 0.01
    assert protocol_settings("datadam", "cifar10", "published") == {"epochs": 1800, "batch_size": 64}
    for method in ("dc", "datadam", "dm", "kip", "lcmat"):
        assert protocol_settings(method, "cifar10", "standard") == {}
    for method in ("dm", "dsa", "idm", "cafe", "mtt"):
        assert protocol_settings(method, "cifar10", "published") == {}  # the standard protocol is theirs
    assert protocol_settings("dc+discrepancy=mmd2", "cifar10", "published") == {"augmentation": "none", "epochs": 300}
    assert is_standard_protocol(protocol_settings("dc", "mnist", "published"))  # DSA, 1000 epochs: the standard
    assert not is_standard_protocol(protocol_settings("dc", "cifar10", "published"))
    assert not is_standard_protocol({"batch_size": 64}) and is_standard_protocol({})


def test_unavailable_and_unknown_protocols_are_clear_errors():
    with pytest.raises(ValueError, match="protocol"):
        protocol_settings("dc", "cifar10", "paper")
    with pytest.raises(ValueError, match="kip.*cannot express"):
        protocol_settings("kip", "cifar10", "published")
    with pytest.raises(ValueError, match="lcmat.*no recorded"):
        protocol_settings("lcmat", "cifar10", "published")
    with pytest.raises(ValueError, match="unknown EvaluationProtocol"):
        PublishedProtocol(source="x", settings={"epoch": 3})
    with pytest.raises(ValueError, match="augmentation"):
        PublishedProtocol(source="x", settings={"augmentation": "cutmix"})


def test_every_row_names_a_method_a_source_and_valid_settings():
    for method, row in PUBLISHED_PROTOCOLS.items():
        assert method in METHOD_NAMES and row.source.strip()
        if not row.unavailable:
            for settings in (row.settings, *row.per_dataset.values()):
                EvaluationProtocol(**settings)


@pytest.fixture(scope="module")
def dc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dc") / "run"
    condense("dc", "digits", ipc=1, iterations=0, out=out, progress=False)
    return out


def test_evaluate_selects_the_protocol_by_name(dc_run):
    standard = evaluate(dc_run, models=1, epochs=0, save=False)
    assert standard["protocol_name"] == "standard" and standard["protocol"]["augmentation"] == "dsa"
    published = evaluate(dc_run, models=1, save=False, protocol="published", epochs=0)
    assert published["protocol_name"] == "published" and published["protocol"]["augmentation"] == "none"
    # an explicit argument overrides the protocol's value; the protocol's epochs apply when none is given
    assert evaluate(dc_run, models=1, epochs=0, save=False, protocol="published",
                    augmentation="dsa")["protocol"]["augmentation"] == "dsa"
    with pytest.raises(ValueError, match="protocol"):
        evaluate(dc_run, models=1, epochs=0, save=False, protocol="best")


def test_published_epochs_apply_when_not_given(dc_run, monkeypatch):
    import ipmcondense.evaluation as evaluation

    seen = []
    monkeypatch.setattr(evaluation, "_train_and_test_prepared", lambda *a: seen.append(a[5]) or 0.5)
    evaluate(dc_run, models=1, save=False, protocol="published")
    assert seen[0].total_epochs == 300 and seen[0].augmentation == "none"


def test_cli_protocol_flag(dc_run, capsys):
    assert main(["evaluate", str(dc_run), "--models", "1", "--epochs", "0", "--protocol", "published"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["protocol_name"] == "published" and report["protocol"]["augmentation"] == "none"

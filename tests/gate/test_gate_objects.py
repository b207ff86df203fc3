"""Each gate alone: a small object whose ``check`` passes (naming what is recorded) or rejects naming itself; the
policy decides which gates a stream has and in which order."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mergeops import gate
from mergeops.errors import RejectedError
from mergeops.fold.methods import METHODS
from mergeops.gate.checkpoint import CurvatureGate, LicenseGate, MergeLockGate, MetricsGate
from mergeops.gate.update_ratio import BaseRelativeUpdateGate, UpdateRatioGate
from mergeops.model import ModelFolder
from mergeops.model.folder import CURVATURE_FILE
from mergeops.policy import GateConfig
from tests.conftest import write_model


@pytest.fixture
def subject(tmp_path, tensors):
    write_model(tmp_path / "ck", tensors)
    with ModelFolder.open(tmp_path / "ck") as folder:
        yield gate.Subject(folder, folder, {})


def method(name: str, **params):
    cls = METHODS[name]
    return cls(cls.check_params(params, "test"))


def test_the_policy_configures_which_gates_run_and_in_which_order():
    config = GateConfig(licenses=("mit",), max_update_ratio=3.0, eval="true {model}")
    names = [g.name for g in gate.gates_for(config, method("mwa"))]
    assert names == ["mergelock", "licenses", "metrics", "max_base_relative_update", "max_update_ratio", "eval"]
    assert [g.name for g in gate.gates_for(GateConfig(), method("ota"))] == ["mergelock", "curvature",
                                                                            "max_base_relative_update"]
    assert [g.phase for g in gate.gates_for(config, method("average"))] == ["checkpoint", "checkpoint", "candidate",
                                                                             "candidate", "candidate"]
    assert [g.name for g in gate.gates_for(GateConfig(), method("ota", metric="loss"))] == [
        "mergelock", "curvature", "metrics", "max_base_relative_update"]


def test_an_unprotected_checkpoint_passes_the_mergelock_gate_unrecorded(subject):
    assert MergeLockGate(allowed=False).check(subject) is None


def test_the_license_gate_reads_the_card(subject):
    with pytest.raises(RejectedError, match="no license") as caught:
        LicenseGate(("mit",)).check(subject)
    assert caught.value.gate == "licenses"
    (subject.checkpoint.path / "README.md").write_text("---\nlicense: MIT\n---\n")
    assert LicenseGate(("mit",)).check(subject) == "licenses"
    with pytest.raises(RejectedError, match="licensed 'MIT'"):
        LicenseGate(("apache-2.0",)).check(subject)


@pytest.mark.parametrize(("metrics", "needle"),
                         [({}, "has no 'loss' metric"), ({"loss": 0.0}, "needs a positive loss")])
def test_the_metrics_gate_wants_each_needed_metric_present_and_positive(subject, metrics, needle):
    subject.metrics = metrics
    with pytest.raises(RejectedError, match=needle) as caught:
        MetricsGate(("loss",), GateConfig()).check(subject)
    assert caught.value.gate == "metrics"


def test_the_curvature_gate_wants_every_floating_tensor_with_its_shape(subject, tensors):
    with pytest.raises(RejectedError, match=r"has no exp_avg_sq\.safetensors"):
        CurvatureGate().check(subject)
    v = {n: t.abs() for n, t in tensors.items()}
    save_file(v | {"model.norm.weight": torch.ones(3)}, subject.checkpoint.path / CURVATURE_FILE)
    with pytest.raises(RejectedError, match=r"has shape \[3\] for tensor 'model.norm.weight'"):
        CurvatureGate().check(subject)
    save_file(v, subject.checkpoint.path / CURVATURE_FILE)
    assert CurvatureGate().check(subject) is None


def test_the_update_ratio_gate_compares_with_the_median_of_accepted_updates(subject):
    subject.update_norm, subject.accepted_norms = 10.0, [1.0, 2.0, 100.0]
    assert UpdateRatioGate(5.0).check(subject) == "max_update_ratio"
    with pytest.raises(RejectedError, match=r"5\.0× the median") as caught:
        UpdateRatioGate(4.0).check(subject)
    assert caught.value.gate == "max_update_ratio"
    subject.accepted_norms = []  # the first checkpoint has nothing to compare with
    assert UpdateRatioGate(1.0).check(subject) == "max_update_ratio"


def test_the_first_update_of_a_stream_is_bounded_relative_to_the_base_and_later_ones_by_their_history(subject):
    subject.update_norm, subject.base_norm, subject.accepted_norms = 6.0, 10.0, []
    assert BaseRelativeUpdateGate(0.6).check(subject) == "max_base_relative_update"
    with pytest.raises(RejectedError, match=r"update norm 6 is 0\.6× the base's weight norm 10, above "
                                            r"max_base_relative_update = 0\.5") as caught:
        BaseRelativeUpdateGate(0.5).check(subject)
    assert caught.value.gate == "max_base_relative_update"
    subject.accepted_norms = [0.1]  # with history, max_update_ratio's comparison applies instead
    assert BaseRelativeUpdateGate(0.5).check(subject) is None

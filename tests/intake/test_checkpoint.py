"""Taking a checkpoint in: described, hashed in the background, compared with the base."""

from __future__ import annotations

import pytest
import torch

from mergeops.errors import RejectedError
from mergeops.intake.checkpoint import receive
from mergeops.ledger.kinds import CheckpointFacts
from mergeops.model import ModelFolder, folder_digest
from tests.conftest import write_model


def test_a_checkpoint_is_described_and_its_digest_is_the_folder_digest(tmp_path, tensors):
    write_model(tmp_path / "ck", tensors)
    with receive(tmp_path / "ck", CheckpointFacts("ck", "now")) as checkpoint:
        assert checkpoint.facts().parameters == sum(t.numel() for t in tensors.values())
        assert checkpoint.facts().dtypes == {"F32": len(tensors)} and checkpoint.facts().digest is None
        assert checkpoint.digest() == folder_digest(tmp_path / "ck") == checkpoint.facts().digest
        assert checkpoint.facts().weights_digest.startswith("sha256:") and checkpoint.digest_known


def test_what_is_not_a_model_folder_is_rejected_by_validation(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RejectedError) as caught:
        receive(tmp_path / "empty", CheckpointFacts("empty"))
    assert caught.value.gate == "validation"


def test_a_checkpoint_unlike_the_base_is_rejected_naming_the_tensor(tmp_path, tensors):
    write_model(tmp_path / "base", tensors)
    write_model(tmp_path / "ck", tensors | {"model.norm.weight": torch.zeros(17)})
    with receive(tmp_path / "ck", CheckpointFacts("ck")) as checkpoint, ModelFolder.open(tmp_path / "base") as base, \
            pytest.raises(RejectedError, match=r"model\.norm\.weight"):
        checkpoint.check_against_base(base)

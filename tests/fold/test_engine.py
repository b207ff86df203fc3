"""The fold engine alone: a FoldJob over real folders, no ledger, no gates, no stream folders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergeops.errors import PolicyError, RejectedError
from mergeops.fold.engine import SCALARS_FILE, FoldJob, fold, read_scalars, state_name
from mergeops.fold.methods import METHODS
from mergeops.fold.methods.base import Arrival
from mergeops.model import ModelFolder, folder_digest
from mergeops.model.finetune import FullFineTune
from tests.conftest import write_model
from tests.fold import reference
from tests.fold.streams import CONFIG, assert_close, make_base, make_checkpoints, read_floats, read_model


def job(tmp_path: Path, base: ModelFolder, checkpoint: ModelFolder, method: str, t: int = 1,
        old_state: ModelFolder | None = None, scalars: dict | None = None, digest=None) -> FoldJob:
    cls = METHODS[method]
    instance = cls(cls.check_params({}, "test"), scalars or {})
    resolve = digest or (lambda: folder_digest(checkpoint.path))
    view = FullFineTune(checkpoint, base)
    instance.begin(Arrival(view, resolve, t=t))
    return FoldJob(stream="s", base=base, checkpoint=view, old_state=old_state, method=instance,
                   output_dir=tmp_path / f"out{t}", state_dir=tmp_path / f"state{t}", dtype="base",
                   metadata=lambda d: {"mergeops.stream": "s", "parent": d}, digest=resolve,
                   digest_known=lambda: True, measure_base=True)


@pytest.mark.parametrize("method", ["task_arithmetic", "opcm"])  # one pass, and two (merged after finish)
def test_two_folds_write_state_and_the_merged_model(tmp_path, method):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 2)
    with ModelFolder.open(base_path) as base_folder, ModelFolder.open(checkpoints[0]) as first:
        done = fold(job(tmp_path, base_folder, first, method))
        scalars = read_scalars(tmp_path / "state1")["scalars"]
        with ModelFolder.open(checkpoints[1]) as second, ModelFolder.open(tmp_path / "state1") as state:
            folded = fold(job(tmp_path, base_folder, second, method, t=2, old_state=state, scalars=scalars))
    expected = (reference.task_arithmetic(base, [read_model(c) for c in checkpoints], 0.3) if method != "opcm" else
                reference.opcm(base, [read_model(c) for c in checkpoints], 0.5, False))
    assert_close(read_floats(tmp_path / "out2"), expected)
    assert set(folded.output_files) >= {"model.safetensors", "config.json"} and SCALARS_FILE in folded.state_files
    taus = [read_floats(c)["model.norm.weight"] - base["model.norm.weight"].double() for c in checkpoints]
    assert folded.update_norm > done.update_norm > float(taus[0].norm())
    floating = [t for t in base.values() if t.is_floating_point()]
    assert done.base_norm == pytest.approx(float(torch.cat([t.double().flatten() for t in floating]).norm()))
    with ModelFolder.open(tmp_path / "state2") as state:
        assert state_name("sum", "model.norm.weight") in state.tensors


@pytest.mark.parametrize("method", ["task_arithmetic", "opcm"])
@pytest.mark.parametrize("damage", ["lacks a tensor", "a tensor of another shape"])
def test_a_damaged_state_stops_the_fold_naming_the_tensor(tmp_path, method, damage):
    """The state is the stream's own file: one that does not hold what the method writes is never folded on."""
    base_path, base = make_base(tmp_path)
    first, second = make_checkpoints(tmp_path, base, 2)
    with ModelFolder.open(base_path) as base_folder, ModelFolder.open(first) as checkpoint:
        fold(job(tmp_path, base_folder, checkpoint, method))
    state = dict(read_model(tmp_path / "state1"))
    victim = state_name("sum", "model.layers.0.self_attn.q_proj.weight")  # both methods keep a sum
    if damage == "lacks a tensor":
        del state[victim]
    else:
        state[victim] = state[victim][:-1]
    write_model(tmp_path / "damaged", state)
    with ModelFolder.open(base_path) as base_folder, ModelFolder.open(second) as checkpoint, \
            ModelFolder.open(tmp_path / "damaged") as damaged, \
            pytest.raises(PolicyError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight'.*damaged"):
        fold(job(tmp_path, base_folder, checkpoint, method, t=2, old_state=damaged))


def test_a_value_that_is_not_finite_stops_the_fold_naming_the_tensor(tmp_path):
    base_path, base = make_base(tmp_path)
    bad = dict(base) | {"model.norm.weight": torch.full_like(base["model.norm.weight"], float("nan"))}
    write_model(tmp_path / "bad", bad, config=CONFIG)
    with ModelFolder.open(base_path) as base_folder, ModelFolder.open(tmp_path / "bad") as checkpoint, \
            pytest.raises(RejectedError, match=r"model\.norm\.weight") as caught:
        fold(job(tmp_path, base_folder, checkpoint, "average"))
    assert caught.value.gate == "finite"


def test_an_update_too_large_to_square_in_float32_has_a_finite_norm(tmp_path):
    # 1e20 is finite in float32 and bfloat16, its square is not: a norm of inf could not be recorded (the ledger's
    # JSON refuses it), and the fold crashed after writing the version instead of recording it or rejecting it.
    base_path, base = make_base(tmp_path)
    big = {n: t.clone() for n, t in base.items()}
    big["model.norm.weight"][0] = 1e20
    write_model(tmp_path / "big", big, config=CONFIG)
    with ModelFolder.open(base_path) as base_folder, ModelFolder.open(tmp_path / "big") as checkpoint:
        done = fold(job(tmp_path, base_folder, checkpoint, "average"))
    assert done.update_norm == pytest.approx(1e20, rel=1e-6) and done.base_norm is not None
    assert math.isfinite(done.base_norm)


def test_an_integer_tensor_unlike_the_base_stops_the_fold(tmp_path):
    base_path, base = make_base(tmp_path)
    write_model(tmp_path / "ids", dict(base) | {"model.position_ids": torch.arange(8) + 1}, config=CONFIG)
    with ModelFolder.open(base_path) as base_folder, ModelFolder.open(tmp_path / "ids") as checkpoint, \
            pytest.raises(RejectedError, match=r"integer tensor 'model\.position_ids' differs"):
        fold(job(tmp_path, base_folder, checkpoint, "average"))


def test_a_digest_that_ends_the_fold_stops_it_before_the_state_is_kept(tmp_path):
    """The pipeline's digest callable raises for a duplicate: nothing of the state may appear."""
    base_path, base = make_base(tmp_path)
    checkpoint_path = make_checkpoints(tmp_path, base, 1)[0]

    def duplicate() -> str:
        raise RejectedError("already folded")

    with ModelFolder.open(base_path) as base_folder, ModelFolder.open(checkpoint_path) as checkpoint, \
            pytest.raises(RejectedError, match="already folded"):
        fold(job(tmp_path, base_folder, checkpoint, "average", digest=duplicate))
    assert not (tmp_path / "state1").exists()

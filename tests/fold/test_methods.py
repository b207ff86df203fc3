"""Every method, folded one checkpoint at a time, equals its batch formula from SPEC §4."""

from __future__ import annotations

import pytest
import torch

import mergeops.model.folder
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from tests.fold import reference
from tests.fold.streams import assert_close, make_base, make_checkpoints, read_floats, read_model, write_policy

CHECKPOINTS = 4


def fold_all(tmp_path, method, params, checkpoints, base_path, dtype="base"):
    policy = load_policy(write_policy(tmp_path, base_path, method, params, dtype=dtype))
    result = None
    for checkpoint in checkpoints:
        result = fold_checkpoint(policy, None, checkpoint)
        assert result.status == "merged", result.reason
    return result


CASES = [
    ("average", {}, lambda b, cs, vs, ms: reference.average(b, cs)),
    ("task_arithmetic", {"lambda": 0.3}, lambda b, cs, vs, ms: reference.task_arithmetic(b, cs, 0.3)),
    ("magmax", {"lambda": 0.5}, lambda b, cs, vs, ms: reference.magmax(b, cs, 0.5)),
    ("ties", {"lambda": 0.3, "density": 0.2}, lambda b, cs, vs, ms: reference.ties(b, cs, 0.3, 0.2)),
    ("opcm", {"alpha": 0.5}, lambda b, cs, vs, ms: reference.opcm(b, cs, 0.5, False)),
    ("opcm", {"alpha": 0.5, "zero_diagonal": True}, lambda b, cs, vs, ms: reference.opcm(b, cs, 0.5, True)),
    ("opcm", {"alpha": 0.8, "skip": ["q_proj"], "project": ["embed_tokens"]},
     lambda b, cs, vs, ms: reference.opcm(
         b, cs, 0.8, False, lambda n, t: t.dim() == 2 and "q_proj" not in n and ("embed" in n or "mlp" in n))),
    ("ota", {}, lambda b, cs, vs, ms: reference.ota(b, cs, vs)),
    ("ota", {"power": 1.0, "density": 0.3}, lambda b, cs, vs, ms: reference.ota(b, cs, vs, power=1.0, density=0.3)),
    ("ota", {"rank1": True, "density": 0.5, "fallback": "mean"},
     lambda b, cs, vs, ms: reference.ota(b, cs, vs, rank1=True, density=0.5, fallback="mean")),
    ("ota", {"metric": "loss"},
     lambda b, cs, vs, ms: reference.ota(b, cs, vs, multipliers=[1 / m["loss"] for m in ms])),
    ("mwa", {"metric": "loss"},
     lambda b, cs, vs, ms: reference.weighted_average(b, cs, [1 / m["loss"] for m in ms])),
    ("mwa", {"metric": "step", "penalty": 2.0},
     lambda b, cs, vs, ms: reference.weighted_average(b, cs, [m["step"] ** 2 for m in ms])),
    ("dare", {"lambda": 0.4, "density": 0.3, "seed": 7}, lambda b, cs, vs, ms: reference.dare(b, cs, 0.4, 0.3, 7)),
    ("dare_ties", {"density": 0.5}, lambda b, cs, vs, ms: reference.dare_ties(b, cs, 0.3, 0.5, 0)),
    ("mwa", {"metric": "loss", "window": 2},
     lambda b, cs, vs, ms: reference.weighted_average(b, cs[-2:], [1 / m["loss"] for m in ms[-2:]])),
]


@pytest.mark.parametrize(("method", "params", "expected"), CASES,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for m, p, _ in CASES])
@pytest.mark.parametrize("shard_bytes", [None, 1500], ids=["single", "sharded"])
@pytest.mark.parametrize("piece", [None, 7], ids=["default-pieces", "tiny-pieces"])
def test_streaming_fold_equals_the_batch_formula(tmp_path, monkeypatch, method, params, expected, shard_bytes, piece):
    """Tiny pieces (a row each) split every tensor folded in pieces, as large tensors are split; OPCM's projections
    then also sum their Gram matrices over as many blocks of rows."""
    import json

    if piece is not None:
        monkeypatch.setattr(mergeops.model.folder, "PIECE", piece)
    base_path, base = make_base(tmp_path, shard_bytes=shard_bytes)
    checkpoints = make_checkpoints(tmp_path, base, CHECKPOINTS, shard_bytes=shard_bytes, curvature=True, metrics=True)
    result = fold_all(tmp_path, method, params, checkpoints, base_path)
    assert result.version == CHECKPOINTS
    models = [read_model(c) for c in checkpoints]
    curvatures = [read_model_file(c / "exp_avg_sq.safetensors") for c in checkpoints]
    metrics = [json.loads((c / "metrics.json").read_text()) for c in checkpoints]
    merged = read_model(result.output)
    assert torch.equal(merged["model.position_ids"], base["model.position_ids"])  # integers copied from the base
    assert_close(read_floats(result.output), expected(base, models, curvatures, metrics))


def read_model_file(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["average", "opcm"])
def test_half_precision_inputs_are_merged_in_float32_and_stored_in_the_base_dtype(tmp_path, dtype, method):
    base_path, base = make_base(tmp_path, dtype=dtype)
    checkpoints = make_checkpoints(tmp_path, base, CHECKPOINTS)
    result = fold_all(tmp_path, method, {}, checkpoints, base_path)
    merged = read_model(result.output)
    assert merged["model.norm.weight"].dtype == dtype
    models = [read_model(c) for c in checkpoints]
    expected = reference.average(base, models) if method == "average" else reference.opcm(base, models, 0.5, False)
    assert_close(read_floats(result.output), expected, rtol=1e-2)  # one rounding to the storage dtype


def test_output_dtype_follows_the_policy(tmp_path):
    base_path, base = make_base(tmp_path, dtype=torch.bfloat16)
    checkpoints = make_checkpoints(tmp_path, base, 2)
    result = fold_all(tmp_path, "average", {}, checkpoints, base_path, dtype="float32")
    merged = read_model(result.output)
    assert merged["model.norm.weight"].dtype == torch.float32
    assert merged["model.position_ids"].dtype == torch.int64
    assert_close(read_floats(result.output), reference.average(base, [read_model(c) for c in checkpoints]))


@pytest.mark.parametrize(("method", "params"), [("average", {}), ("task_arithmetic", {}), ("ota", {}),
                                                ("mwa", {"metric": "loss"})])
def test_order_does_not_matter_where_the_math_says_so(tmp_path, method, params):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, CHECKPOINTS, curvature=True, metrics=True)
    forward = fold_all(tmp_path / "a", method, params, checkpoints, base_path)
    backward = fold_all(tmp_path / "b", method, params, checkpoints[::-1], base_path)
    assert_close(read_floats(forward.output), read_floats(backward.output), rtol=1e-5)


def test_opcm_depends_on_order(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, CHECKPOINTS)
    forward = read_floats(fold_all(tmp_path / "a", "opcm", {}, checkpoints, base_path).output)
    backward = read_floats(fold_all(tmp_path / "b", "opcm", {}, checkpoints[::-1], base_path).output)
    name = "model.layers.0.mlp.up_proj.weight"
    assert float((forward[name] - backward[name]).abs().max()) > 1e-3


def test_opcm_first_version_is_the_first_checkpoint(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 1)
    result = fold_all(tmp_path, "opcm", {}, checkpoints, base_path)
    assert_close(read_floats(result.output), read_floats(checkpoints[0]), rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (120, 120)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("condition", [1e2, 1e6])  # distinct σ: with equal ones r is a coin toss
@pytest.mark.parametrize("block", [None, 100], ids=["one-block", "blocks-of-a-row-or-two"])
def test_opcm_projection_is_as_accurate_as_float64(monkeypatch, shape, condition, block):
    """The projection, computed from the eigendecomposition of S's Gram matrix, stays within 1e-5 of float64 even
    where a float32 LAPACK SVD drifts (zero_diagonal on an ill-conditioned S), whether or not its work is split
    into blocks of rows."""
    from mergeops.fold.methods import opcm

    if block is not None:
        monkeypatch.setattr(mergeops.model.folder, "PIECE", block)
    g = torch.Generator().manual_seed(0)
    m, n = shape
    k = min(shape)
    left, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))
    right, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    accumulated = ((left * torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), k,
                                          dtype=torch.float64)) @ right.T).float()
    tau = 0.01 * torch.randn(m, n, generator=g)
    for zero_diagonal in (False, True):
        ours = opcm.project_update(accumulated, tau.clone(), 0.5, zero_diagonal).double()  # it overwrites τ
        expected = reference.project_update(accumulated.double(), tau.double(), 0.5, zero_diagonal)
        assert float((ours - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("shape", [(40, 30), (30, 40)], ids=["tall", "wide"])
def test_opcm_projection_of_a_rank_deficient_sum_leaves_its_undefined_directions_alone(shape):
    """Where S has no extent (σ_i = 0) its left singular vectors are arbitrary, in any SVD: the top-r block is
    removed as usual, and the diagonal only along the directions S defines."""
    from mergeops.fold.methods.opcm import project_update

    g = torch.Generator().manual_seed(1)
    accumulated = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
    tau = torch.randn(shape, generator=g)
    for zero_diagonal in (False, True):
        ours = project_update(accumulated, tau.clone(), 0.5, zero_diagonal).double()
        expected = reference.project_update(accumulated.double(), tau.double(), 0.5, zero_diagonal, diagonal_rank=3)
        assert float((ours - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("shape", [(40, 30), (30, 40)], ids=["tall", "wide"])
def test_opcm_protects_only_directions_the_sum_defines_even_with_alpha_one(shape):
    """With α = 1 every singular direction would be protected; those S does not define (σ_i = 0) are left out,
    the same way for a tensor and for its transpose."""
    from mergeops.fold.methods.opcm import project_update

    g = torch.Generator().manual_seed(2)
    accumulated = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
    tau = torch.randn(shape, generator=g)
    ours = project_update(accumulated, tau.clone(), 1.0, False)
    transposed = project_update(accumulated.T.contiguous(), tau.T.contiguous(), 1.0, False).T
    u, _, vh = torch.linalg.svd(accumulated.double())
    expected = tau.double() - u[:, :3] @ (u[:, :3].T @ tau.double() @ vh[:3].T) @ vh[:3]
    assert torch.allclose(ours.double(), expected, atol=1e-5) and torch.allclose(transposed, ours, atol=1e-5)


def test_opcm_projection_of_a_zero_sum_removes_nothing():
    from mergeops.fold.methods.opcm import project_update

    tau = torch.randn(6, 4)
    assert torch.equal(project_update(torch.zeros(6, 4), tau.clone(), 0.5, True), tau)

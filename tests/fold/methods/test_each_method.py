"""Each merge method on its own, driven through its protocol in memory (no engine, no disk but OTA's curvature
files), equals its batch formula from SPEC §4; the composable parts and DARE's drop behave as documented."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import mergeops.model.folder
from mergeops.errors import PolicyError
from mergeops.fold.methods import METHODS
from mergeops.fold.methods.base import Piece
from mergeops.fold.methods.parts import agreeing_sum, drop_and_rescale, max_magnitude, trim, uniform_by_position
from mergeops.model.folder import CURVATURE_FILE
from tests.conftest import random_tensors, write_model
from tests.fold import reference
from tests.fold.methods.drive import fold_in_memory
from tests.fold.streams import assert_close

COUNT = 4


def checkpoints_of(base: dict[str, torch.Tensor], count: int = COUNT) -> list[dict[str, torch.Tensor]]:
    found = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        found.append({n: t + torch.randn(t.shape, generator=g) * 0.05 * (i + 1) for n, t in base.items()})
    return found


@pytest.fixture
def base() -> dict[str, torch.Tensor]:
    return random_tensors()


METRICS = [{"loss": 0.5 + 0.37 * i, "step": 100.0 * (i + 1)} for i in range(COUNT)]


CASES = [
    ("average", {}, lambda b, cs: reference.average(b, cs)),
    ("task_arithmetic", {"lambda": 0.3}, lambda b, cs: reference.task_arithmetic(b, cs, 0.3)),
    ("magmax", {"lambda": 0.5}, lambda b, cs: reference.magmax(b, cs, 0.5)),
    ("ties", {"lambda": 0.3, "density": 0.2}, lambda b, cs: reference.ties(b, cs, 0.3, 0.2)),
    ("opcm", {"alpha": 0.5}, lambda b, cs: reference.opcm(b, cs, 0.5, False)),
    ("opcm", {"alpha": 0.5, "zero_diagonal": True}, lambda b, cs: reference.opcm(b, cs, 0.5, True)),
    ("mwa", {"metric": "loss"}, lambda b, cs: reference.weighted_average(b, cs, [1 / m["loss"] for m in METRICS])),
    ("mwa", {"metric": "step", "penalty": 2.0},
     lambda b, cs: reference.weighted_average(b, cs, [m["step"] ** 2 for m in METRICS])),
    ("dare", {"lambda": 0.4, "density": 0.3, "seed": 7}, lambda b, cs: reference.dare(b, cs, 0.4, 0.3, 7)),
    ("dare_ties", {"lambda": 0.3, "density": 0.5}, lambda b, cs: reference.dare_ties(b, cs, 0.3, 0.5, 0)),
]


@pytest.mark.parametrize(("method", "params", "expected"), CASES,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for m, p, _ in CASES])
@pytest.mark.parametrize("piece", [None, 7], ids=["default-pieces", "tiny-pieces"])
def test_a_method_alone_equals_its_batch_formula(monkeypatch, base, method, params, expected, piece):
    if piece is not None:
        monkeypatch.setattr(mergeops.model.folder, "PIECE", piece)
    checkpoints = checkpoints_of(base)
    merged = fold_in_memory(method, params, base, checkpoints, metrics=METRICS)
    assert_close(merged, expected(base, checkpoints))


@pytest.mark.parametrize("params", [{}, {"rank1": True, "density": 0.5, "fallback": "mean"}, {"metric": "loss"}],
                         ids=["plain", "rank1-grafted-mean", "loss-multiplier"])
def test_ota_alone_equals_its_batch_formula(tmp_path, base, params):
    checkpoints = checkpoints_of(base)
    curvatures, folders = [], []
    for i in range(COUNT):
        g = torch.Generator().manual_seed(7 + i)
        v = {n: (torch.rand(t.shape, generator=g) ** 3) * 1e-6 for n, t in base.items()}
        folder = write_model(tmp_path / f"ck{i}", checkpoints[i])
        save_file(v, folder / CURVATURE_FILE)
        curvatures.append(v)
        folders.append(folder)
    merged = fold_in_memory("ota", params, base, checkpoints, metrics=METRICS, folders=folders)
    keywords = {k: v for k, v in params.items() if k in ("rank1", "density", "fallback")}
    if "metric" in params:
        keywords["multipliers"] = [1 / m["loss"] for m in METRICS]
    assert_close(merged, reference.ota(base, checkpoints, curvatures, **keywords))


def test_elementwise_methods_infer_their_parameters_from_the_function_signatures():
    dare = METHODS["dare"]
    assert {k: p.default for k, p in dare.params.items()} == {"density": 0.5, "seed": 0, "lambda": 0.3}
    assert dare.params["seed"].kind is int and dare.params["lambda"].kind is float
    assert dare({"density": 0.5, "seed": 0, "lambda": 0.3}).state_kinds() == ("sum",)
    assert dare.check_params({"lambda": 1}, "here")["lambda"] == 1.0  # an int where a float is declared
    with pytest.raises(PolicyError, match="density must be in"):
        dare.check_params({"density": 0.0}, "here")
    with pytest.raises(PolicyError, match="did you mean 'seed'"):
        dare.check_params({"sed": 3}, "here")


def test_dare_draws_the_same_whatever_the_pieces():
    whole = uniform_by_position("dare:0:1:w", Piece("w", 0, 1000))
    cut = torch.cat([uniform_by_position("dare:0:1:w", Piece("w", a, b)) for a, b in ((0, 7), (7, 500), (500, 1000))])
    assert torch.equal(whole, cut)
    assert float(whole.min()) >= 0.0 and float(whole.max()) < 1.0
    other = uniform_by_position("dare:1:1:w", Piece("w", 0, 1000))
    assert not torch.equal(whole, other)  # another seed (or checkpoint, or tensor) draws otherwise


def test_dare_keeps_about_density_of_the_entries_and_rescales_them():
    tau = torch.ones(200_000)
    dropped = drop_and_rescale(tau.clone(), 0.3, seed=5, t=2, piece=Piece("w", 0, tau.numel()))
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.01
    assert torch.allclose(dropped[kept], torch.full_like(dropped[kept], 1 / 0.3))  # E[DARE(τ)] = τ


def test_continual_dare_never_drops_the_running_sum(base):
    """Each fold drops only the new task vector: the share of entries the sum holds grows towards 1 − (1 − d)^t,
    where re-dropping the sum would shrink it towards nothing."""
    name = "model.layers.0.mlp.up_proj.weight"
    small = {name: base[name]}
    checkpoints = checkpoints_of(small, 6)
    shares = []
    for count in range(1, 7):
        merged = fold_in_memory("dare", {"density": 0.3, "lambda": 1.0}, small, checkpoints[:count])
        shares.append(float(((merged[name] - small[name]) != 0).float().mean()))
    assert shares == sorted(shares) and shares[-1] > 0.8 > shares[0]


def test_consensus_parts():
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-0.5, -1.0, -4.0, 0.5])
    assert torch.equal(agreeing_sum(a, b), torch.tensor([1.0, -3.0, -4.0, 1.0]))  # entries agreeing with sign(a + b)
    assert torch.equal(max_magnitude(a.clone(), b), torch.tensor([1.0, -2.0, -4.0, 0.5]))  # ties keep the earlier
    assert torch.equal(trim(a, 1.0), torch.tensor([1.0, -2.0, 3.0, 0.0]))  # ties at the threshold kept


def _splitmix_reference(key: str, position: int) -> float:
    """splitmix64 of the position, in Python's exact integers, as DARE's draw is meant to be."""
    import hashlib

    mask = (1 << 64) - 1
    x = (position * 0x9E3779B97F4A7C15 + int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return ((x ^ (x >> 31)) >> 11) / 2 ** 53


@pytest.mark.parametrize("start", [0, 1 << 40])
def test_dare_draws_are_splitmix64_exactly(start):
    """torch's wrapping int64 arithmetic gives the bits of the unsigned algorithm: the draw is portable."""
    drawn = uniform_by_position("dare:3:2:w", Piece("w", start, start + 500))
    assert drawn.tolist() == [_splitmix_reference("dare:3:2:w", start + i) for i in range(500)]


def test_elementwise_refuses_functions_that_disagree_on_their_state_or_parameters():
    from mergeops.fold.methods.base import Param, elementwise

    def merged(base, total):
        return base + total

    def fold_named_otherwise(base, new, sum):
        return new

    with pytest.raises(TypeError, match="state arguments"):
        elementwise("broken", fold_named_otherwise, merged)

    def fold(base, new, total, *, scale: float = Param(1.0)):
        return new

    def merged_declaring_again(base, total, *, scale: float = Param(2.0)):
        return base + total

    with pytest.raises(TypeError, match="one declaration"):
        elementwise("broken", fold, merged_declaring_again)


def test_a_metric_weight_needs_a_positive_metric():
    """The metrics gate rejects such checkpoints first; a method used on its own still refuses them."""
    from mergeops.fold.methods.parts import metric_weight

    assert metric_weight({"loss": 0.5}, "loss", 2.0) == 4.0 and metric_weight({"step": 3.0}, "step", 1.0) == 3.0
    with pytest.raises(ValueError, match="must be positive"):
        metric_weight({"loss": -0.5}, "loss", 0.5)

"""OPCM on LoRA adapters (real ones, made with peft on tiny transformers models): while every update of a projected
tensor comes as factors its sum is kept as factors, and the merged model equals the dense fold of the same updates
(each adapter merged into a full model with peft's ``merge_and_unload``), folded one checkpoint per fresh method
instance with the state read back from disk, as separate processes do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergeops.fold.engine import FoldJob, fold, read_scalars, state_layout
from mergeops.fold.methods import METHODS
from mergeops.fold.methods.base import Arrival
from mergeops.fold.methods.opcm import max_factored_rank
from mergeops.intake.checkpoint import reopen
from mergeops.model import ModelFolder
from mergeops.model.finetune import AdapterFineTune
from tests.adapters import HIDDEN, INTERMEDIATE, LLAMA_LINEAR
from tests.adapters import adapter_and_merged as make_adapter
from tests.adapters import tiny_base as make_base
from tests.fold import reference
from tests.fold.streams import assert_close, read_floats


class ReadsRecorded(AdapterFineTune):
    """An adapter read as the fold reads it, noting which tensors' values were asked for."""

    def __init__(self, view: AdapterFineTune, reads: set[str]) -> None:
        super().__init__(view.adapter, view.base)
        self.reads = reads

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        self.reads.add(name)
        return super().read(name, start, stop)


def fold_stream(root: Path, base_path: Path, checkpoints: list[Path], params: dict,
                reads: set[str] | None = None) -> tuple[Path, Path]:
    """Fold ``checkpoints`` in order, each with a fresh method instance whose scalars and state are read from disk;
    the last merged model's folder and state folder. ``reads`` collects the tensors whose values an adapter was read
    for."""
    cls = METHODS["opcm"]
    checked = cls.check_params(params, "test")
    scalars: dict = {}
    old_state = None
    with ModelFolder.open(base_path) as base:
        for t, path in enumerate(checkpoints, 1):
            method = cls(checked, scalars)
            digest = f"sha256:{t:064d}"
            with reopen(path, base, vocab="reject") as view:
                if reads is not None and isinstance(view, AdapterFineTune):
                    view = ReadsRecorded(view, reads)
                method.begin(Arrival(view, lambda d=digest: d, t=t))
                job = FoldJob(stream="s", base=base, checkpoint=view, old_state=old_state, method=method,
                              output_dir=root / f"out{t}", state_dir=root / f"state{t}", dtype="base",
                              metadata=lambda d: {"mergeops.stream": "s", "parent": d},
                              digest=lambda d=digest: d, digest_known=lambda: True)
                fold(job)
            if old_state is not None:
                old_state.close()
            scalars = read_scalars(root / f"state{t}")["scalars"]
            old_state = ModelFolder.open(root / f"state{t}")
        old_state.close()
    return root / f"out{len(checkpoints)}", root / f"state{len(checkpoints)}"


def layout(state: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    with ModelFolder.open(state) as folder:
        return state_layout(folder)


LLAMA_ADAPTERS = [  # rank, targets, rsLoRA
    (2, ["q_proj", "v_proj"], False),
    (3, LLAMA_LINEAR, False),
    (4, ["q_proj", "o_proj", "down_proj"], True),
    (2, ["q_proj", "up_proj", "gate_proj", "k_proj"], False),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[tuple[Path, Path]]]:
    root = tmp_path_factory.mktemp("llama")
    base = make_base(root, "llama")
    return base, [make_adapter(base, root / f"a{i}", seed=i, rank=rank, targets=targets, rslora=rslora)
                  for i, (rank, targets, rslora) in enumerate(LLAMA_ADAPTERS, 1)]


@pytest.mark.parametrize("zero_diagonal", [False, True], ids=["plain", "zero-diagonal"])
def test_an_all_adapter_stream_keeps_factored_sums_and_equals_the_dense_fold(tmp_path, llama, zero_diagonal):
    base, adapters = llama
    params = {"alpha": 0.5, "zero_diagonal": zero_diagonal}
    merged, state = fold_stream(tmp_path / "lora", base, [a for a, _ in adapters], params)
    dense, dense_state = fold_stream(tmp_path / "dense", base, [f for _, f in adapters], params)
    assert_close(read_floats(merged), read_floats(dense), rtol=1e-5)
    if not zero_diagonal:  # the formula itself (its diagonal terms in S's null space are arbitrary, so not then)
        base_tensors = read_floats(base)
        expected = reference.opcm(base_tensors, [read_floats(f) for _, f in adapters], 0.5, False)
        assert_close(read_floats(merged), expected, rtol=1e-5)
    # every projected tensor is kept as factors as wide as the ranks that reached it; the rest is dense
    found, dense_found = layout(state), layout(dense_state)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert found[q] == {"sum.left": (HIDDEN, 11), "sum.right": (11, HIDDEN)}
    assert found["model.layers.1.mlp.down_proj.weight"] == {"sum.left": (HIDDEN, 7), "sum.right": (7, INTERMEDIATE)}
    assert found["model.layers.1.self_attn.k_proj.weight"] == {"sum.left": (32, 5), "sum.right": (5, HIDDEN)}
    assert found["model.embed_tokens.weight"] == {"sum": (64, HIDDEN)}
    assert all(kinds == {"sum"} for kinds in map(set, dense_found.values()))
    # the factors are S: their product is the dense fold's sum, and the scalars agree
    with ModelFolder.open(state) as lowrank, ModelFolder.open(dense_state) as full:
        product = lowrank.read(f"sum.left::{q}").double() @ lowrank.read(f"sum.right::{q}").double()
        expected_sum = full.read(f"sum::{q}").double()
        assert float((product - expected_sum).abs().max() / expected_sum.abs().max()) < 1e-5
    ours, theirs = read_scalars(state)["scalars"], read_scalars(dense_state)["scalars"]
    assert ours["task_norms"] == pytest.approx(theirs["task_norms"], rel=1e-6)
    assert ours["sum_norm"] == pytest.approx(theirs["sum_norm"], rel=1e-6)


@pytest.mark.parametrize("order", ["AFA", "FAA", "AAF"])
@pytest.mark.parametrize("zero_diagonal", [False, True], ids=["plain", "zero-diagonal"])
def test_a_stream_mixing_adapters_and_full_checkpoints_equals_the_dense_fold(tmp_path, llama, order, zero_diagonal):
    base, adapters = llama
    params = {"alpha": 0.5, "zero_diagonal": zero_diagonal}
    mixed = [adapter if kind == "A" else full for kind, (adapter, full) in zip(order, adapters, strict=False)]
    merged, state = fold_stream(tmp_path / "mixed", base, mixed, params)
    dense, _ = fold_stream(tmp_path / "dense", base, [f for _, f in adapters[:len(order)]], params)
    assert_close(read_floats(merged), read_floats(dense), rtol=1e-5)
    # once a full checkpoint came, every sum is dense for good
    assert all(set(kinds) == {"sum"} for kinds in layout(state).values())


def test_a_sum_grown_past_the_rank_threshold_turns_dense_and_equals_the_dense_fold(tmp_path):
    base = make_base(tmp_path, "bert")
    limit = max_factored_rank(HIDDEN, HIDDEN)
    ranks = [limit // 2, limit // 2, 3, 2]  # the query's sum reaches the limit at t = 2 and passes it at t = 3
    adapters = [make_adapter(base, tmp_path / f"a{i}", seed=i, rank=rank, targets=["query", "value", "dense"] if i < 4
                             else ["query", "key"], rslora=i == 2) for i, rank in enumerate(ranks, 1)]
    params = {"alpha": 0.6, "zero_diagonal": True}
    after_two = layout(fold_stream(tmp_path / "two", base, [a for a, _ in adapters[:2]], params)[1])
    query = "encoder.layer.0.attention.self.query.weight"
    assert after_two[query] == {"sum.left": (HIDDEN, limit), "sum.right": (limit, HIDDEN)}
    merged, state = fold_stream(tmp_path / "lora", base, [a for a, _ in adapters], params)
    dense, _ = fold_stream(tmp_path / "dense", base, [f for _, f in adapters], params)
    assert_close(read_floats(merged), read_floats(dense), rtol=1e-5)
    found = layout(state)
    assert found[query] == {"sum": (HIDDEN, HIDDEN)}
    key = "encoder.layer.1.attention.self.key.weight"  # only the last adapter updated it: rank 2, factored
    assert found[key] == {"sum.left": (HIDDEN, 2), "sum.right": (2, HIDDEN)}


def test_the_fold_never_reads_the_values_of_a_tensor_whose_sum_stays_factored(tmp_path, llama):
    """Its new state comes from the adapter's factors alone: the values θ0 + B·A are not computed for it."""
    base, adapters = llama
    reads: set[str] = set()
    _, state = fold_stream(tmp_path / "run", base, [a for a, _ in adapters], {"alpha": 0.5}, reads)
    factored = {name for name, kinds in layout(state).items() if "sum.left" in kinds}
    assert factored and not factored & reads
    assert reads  # what is not factored (embeddings, norms) is still read

"""A PEFT LoRA adapter of the stream's base is taken in like a full checkpoint: every method folds it exactly as it
folds the full model peft's ``merge_and_unload()`` makes of it; an adapter that does not fit the base, or that uses
PEFT features whose update is not scale·B·A, is rejected by name and changes nothing."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergeops.commit.owner import OWNER_FILE
from mergeops.fold.methods import METHODS
from mergeops.ledger import Ledger
from mergeops.ledger.lineage import lineage
from mergeops.model import ModelFolder
from mergeops.model import adapter as adapter_module
from mergeops.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, layer_index
from mergeops.model.folder import CURVATURE_FILE
from mergeops.patterns import CHILD_SECONDS
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from tests.adapters import FAMILIES, TARGETS, make_adapter, merged_by_peft, tiny_base
from tests.conftest import write_model
from tests.fold.streams import assert_close, read_model, write_policy

pytestmark = pytest.mark.timeout(600)


def with_inputs(folder: Path, base: Path, seed: int) -> Path:
    """Give a checkpoint folder what every method may ask of it: training metrics, and curvature over the base's
    floating tensors (for an adapter too: OTA weighs full-size updates)."""
    (folder / "metrics.json").write_text(json.dumps({"loss": 0.4 + 0.3 * seed, "step": 100 * seed}))
    generator = torch.Generator().manual_seed(1000 + seed)
    with ModelFolder.open(base) as model:
        v = {name: torch.rand(info.shape, generator=generator) ** 3 * 1e-6
             for name, info in model.tensors.items() if info.dtype.is_floating_point}
    write_model(folder / "curvature", v)
    (folder / "curvature" / "model.safetensors").rename(folder / CURVATURE_FILE)
    shutil.rmtree(folder / "curvature")
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def adapters(request, tmp_path_factory):
    """A base, three adapters of it (different targets, ranks, scales, one rsLoRA), and peft's full model of each."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = tiny_base(root, family)
    first, second = TARGETS[family]
    made = [make_adapter(base, root / "a1", seed=1, rank=4, alpha=8, targets=first),
            make_adapter(base, root / "a2", seed=2, rank=2, alpha=3, targets=second, rslora=True),
            make_adapter(base, root / "a3", seed=3, rank=8, alpha=16, targets=first + second)]
    full = [merged_by_peft(base, adapter, root / f"full{i}") for i, adapter in enumerate(made, 1)]
    for seed, (adapter, model) in enumerate(zip(made, full, strict=True), 1):
        with_inputs(adapter, base, seed)
        with_inputs(model, base, seed)
    return base, made, full


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_folds_an_adapter_as_it_folds_pefts_merged_full_model(tmp_path, adapters, method):
    base, made, full = adapters
    results = {}
    for kind, checkpoints in (("adapter", made), ("full", full)):
        policy = load_policy(write_policy(tmp_path / kind, base, method))
        for checkpoint in checkpoints:
            result = fold_checkpoint(policy, None, checkpoint)
            assert result.status == "merged", result.reason
        results[kind] = read_model(result.output)
    floats = {n for n, t in results["full"].items() if t.dtype.is_floating_point}
    assert_close({n: results["adapter"][n] for n in floats}, {n: results["full"][n] for n in floats}, rtol=1e-6)
    assert all(torch.equal(results["adapter"][n], results["full"][n]) for n in results["full"] if n not in floats)


def test_the_ledger_records_that_the_checkpoint_was_an_adapter_with_its_settings(tmp_path, adapters):
    base, made, _ = adapters
    policy = load_policy(write_policy(tmp_path, base, "task_arithmetic"))
    result = fold_checkpoint(policy, None, made[1])
    assert result.status == "merged", result.reason
    with Ledger.open_readonly(policy.home) as ledger:
        [committed] = [json.loads(e["payload"]) for e in ledger.events() if e["kind"] == "version.committed"]
    facts = committed["checkpoint"]
    assert facts["adapter"]["r"] == 2 and facts["adapter"]["use_rslora"] is True
    assert facts["adapter"]["base_model_name_or_path"] == str(base)
    assert facts["parameters"] == sum(t.numel() for t in read_model_weights(made[1]).values())
    with Ledger.open_readonly(policy.home) as ledger:
        [step] = lineage(ledger, str(result.output))["steps"]
    assert step["checkpoint"]["adapter"] == facts["adapter"]
    card = (result.output / "README.md").read_text()
    assert "`a2` (LoRA adapter, r=2)" in card
    envelope = json.loads((result.output / "provenance.json").read_text())
    provenance = json.loads(base64.b64decode(envelope["payload"]))
    [folded] = [d for d in provenance["predicate"]["buildDefinition"]["resolvedDependencies"]
                if d["annotations"]["role"] == "checkpoint"]
    assert folded["annotations"]["lora_adapter"]["r"] == 2


def read_model_weights(adapter: Path) -> dict[str, torch.Tensor]:
    with ModelFolder.open(adapter, ADAPTER_WEIGHTS) as folder:
        return dict(folder.iter_tensors())


def edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config | changes))


def rewrite_weights(adapter: Path, change) -> None:
    from safetensors.torch import save_file

    save_file(change(read_model_weights(adapter)), str(adapter / ADAPTER_WEIGHTS))


def rename_first_pair(module: str):
    def change(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        old = next(iter(tensors)).rsplit(".lora_", 1)[0]
        return {n.replace(old, f"base_model.model.{module}") if n.startswith(old + ".") else n: t
                for n, t in tensors.items()}
    return change


def link_config_outside(adapter: Path) -> None:
    outside = adapter.parent / "elsewhere.json"
    (adapter / ADAPTER_CONFIG).rename(outside)
    (adapter / ADAPTER_CONFIG).symlink_to(outside)


def truncate(adapter: Path) -> None:
    data = (adapter / ADAPTER_WEIGHTS).read_bytes()
    (adapter / ADAPTER_WEIGHTS).write_bytes(data[:len(data) - 100])


REJECTIONS = {
    "another base": (lambda a: edit_config(a, base_model_name_or_path="org/some-other-model"),
                     "is an adapter of 'org/some-other-model'"),
    "no base named": (lambda a: edit_config(a, base_model_name_or_path=None), "names no base model"),
    "DoRA": (lambda a: edit_config(a, use_dora=True), "use_dora"),
    "modules_to_save": (lambda a: edit_config(a, modules_to_save=["lm_head"]), "modules_to_save"),
    "trained biases": (lambda a: edit_config(a, bias="all"), "bias = 'all'"),
    "another PEFT type": (lambda a: edit_config(a, peft_type="IA3"), "peft_type 'IA3'"),
    "unknown setting": (lambda a: edit_config(a, some_future_variant={"on": True}), "some_future_variant"),
    "alpha that is NaN": (lambda a: (a / ADAPTER_CONFIG).write_text(
        (a / ADAPTER_CONFIG).read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')), "holds NaN"),
    "config not UTF-8": (lambda a: (a / ADAPTER_CONFIG).write_bytes(b"{\"peft_type\": \"\xff\"}"), "not UTF-8"),
    "rank that disagrees": (lambda a: edit_config(a, r=5), "has rank 4 but adapter_config.json says r = 5"),
    "unknown target": (lambda a: rewrite_weights(a, rename_first_pair("model.layers.9.self_attn.q_proj")),
                       "has no tensor 'model.layers.9.self_attn.q_proj.weight'"),
    "factors of a module not targeted": (
        lambda a: rewrite_weights(a, rename_first_pair("model.layers.0.self_attn.k_proj")),
        "target_modules, exclude_modules and layers_to_transform do not adapt (PEFT would ignore them)"),
    "factors of a layer layers_to_transform leaves out": (
        lambda a: edit_config(a, layers_to_transform=[0]),
        "holds factors of module 'model.layers.1.self_attn.q_proj', which adapter_config.json's target_modules, "
        "exclude_modules and layers_to_transform do not adapt (PEFT would ignore them)"),
    "layers found by a pattern": (lambda a: edit_config(a, layers_to_transform=[0, 1], layers_pattern="layers"),
                                  "sets layers_pattern = \"layers\" with layers_to_transform"),
    "layers that are no numbers": (lambda a: edit_config(a, layers_to_transform=["0"]),
                                   "has a layers_to_transform that is neither a layer number nor a list of them"),
    "a factor twice": (lambda a: rewrite_weights(a, lambda t: t | {
        next(n for n in t if n.endswith("lora_A.weight")).removesuffix(".weight"): next(iter(t.values())).clone()}),
                       "two lora_A factors"),
    "a rank pattern only Python can match, too slow": (
        lambda a: edit_config(a, rank_pattern={"(?=m)(.*.*)*!": 2}),
        f"'(?=m)(.*.*)*!' took longer than {CHILD_SECONDS:g} s to match; name the modules instead"),
    "a target pattern nested too deeply": (lambda a: edit_config(a, target_modules="(?:" * 600 + ".*" + ")" * 600),
                                           "nests groups too deeply"),
    "a target pattern PEFT's compiler refuses": (lambda a: edit_config(a, target_modules=r".*(?<=a+)_proj"),
                                                 "look-behind requires fixed-width pattern"),
    "an inline flag in a rank pattern": (lambda a: edit_config(a, rank_pattern={"(?i)Q_PROJ": 2}),
                                         "not a regular expression PEFT can use"),
    "a base weight replaced": (lambda a: rewrite_weights(a, lambda t: t | {
        "base_model.model.lm_head.base_layer.weight": torch.zeros(64, 64)}), "a replacement of the base's 'lm_head"),
    "pickle factors only": (lambda a: (a / ADAPTER_WEIGHTS).rename(a / "adapter_model.bin"), "only as pickle"),
    "a full model beside it": (lambda a: shutil.copyfile(a / ADAPTER_WEIGHTS, a / "model.safetensors"),
                               "both a LoRA adapter"),
    "config that is a folder": (lambda a: ((a / ADAPTER_CONFIG).unlink(), (a / ADAPTER_CONFIG).mkdir()),
                                "is a folder, not a regular file"),
    "DoRA magnitude tensor": (lambda a: rewrite_weights(a, lambda t: t | {
        next(iter(t)).rsplit(".lora_", 1)[0] + ".lora_magnitude_vector": torch.ones(4)}), "a DoRA magnitude"),
    "half a pair": (lambda a: rewrite_weights(a, lambda t: dict(list(t.items())[1:])), "incomplete pair"),
    "wrong shape": (lambda a: rewrite_weights(a, lambda t: {n: torch.zeros(4, 7) if "lora_A" in n else v
                                                            for n, v in t.items()}), "make an update of shape"),
    "truncated weights": (truncate, ADAPTER_WEIGHTS),
    "config linked from outside": (lambda a: link_config_outside(a), "outside the adapter's folder"),
    "NaN in a factor": (lambda a: rewrite_weights(a, lambda t: {n: v.index_fill(0, torch.tensor([0]), float("nan"))
                                                              if "lora_B" in n else v for n, v in t.items()}),
                        "non-finite"),
    "factors that overflow": (lambda a: rewrite_weights(a, lambda t: {n: v * 1e30 for n, v in t.items()}),
                              "non-finite"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_an_adapter_that_does_not_fit_is_rejected_by_name_and_changes_nothing(tmp_path, case):
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    spoil, needle = REJECTIONS[case]
    spoil(adapter)
    policy = load_policy(write_policy(tmp_path, base, "task_arithmetic"))
    result = fold_checkpoint(policy, None, adapter)
    assert result.status == "rejected"
    assert needle in result.reason, result.reason
    assert not (tmp_path / "out").exists() or [p.name for p in (tmp_path / "out").iterdir()] == [OWNER_FILE]
    with Ledger.open_readonly(policy.home) as ledger:
        assert [e["kind"] for e in ledger.events()] == ["checkpoint.rejected"]
        assert ledger.head("s") is None


def assert_folds_as_pefts_merged_model(root: Path, base: Path, adapter: Path) -> None:
    """Task arithmetic with λ = 1 of the adapter alone equals that of peft's merged model of it (to 1e-6)."""
    results = {}
    for kind, checkpoint in (("adapter", adapter), ("full", merged_by_peft(base, adapter, root / "full"))):
        policy = load_policy(write_policy(root / kind, base, "task_arithmetic", {"lambda": 1.0}))
        result = fold_checkpoint(policy, None, checkpoint)
        assert result.status == "merged", result.reason
        results[kind] = read_model(result.output)
    assert_close(results["adapter"], results["full"], rtol=1e-6)


def test_a_rank_pattern_and_an_alpha_pattern_scale_each_module_as_peft_does(tmp_path):
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=4, rank=4, alpha=8, targets=["q_proj", "v_proj"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    assert_folds_as_pefts_merged_model(tmp_path, base, adapter)


def test_more_pattern_tests_than_the_bound_are_a_rejection_not_minutes_of_matching(tmp_path, monkeypatch):
    """1 MiB of rank_pattern keys against the modules of a 2 MB header took 45 minutes (4 µs a pair)."""
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    edit_config(adapter, rank_pattern={f"k{i}x": 4 for i in range(30)})  # 30 patterns, 4 modules
    monkeypatch.setattr(adapter_module, "MAX_PATTERN_TESTS", 100)
    result = fold_checkpoint(load_policy(write_policy(tmp_path, base, "task_arithmetic")), None, adapter)
    assert result.status == "rejected"
    assert ("'k0x' and the config's 29 other module patterns, matched against 4 modules, make 120 tests, more than "
            "the 100 mergeops makes; name fewer patterns") in result.reason, result.reason


def test_an_adapter_of_some_layers_folds_as_peft_merges_it(tmp_path):
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=6, rank=4, alpha=8, targets=["q_proj", "v_proj"],
                           layers_to_transform=[1])
    assert_folds_as_pefts_merged_model(tmp_path, base, adapter)


@pytest.mark.parametrize("module", [
    "model.layers.0.self_attn.q_proj", "model.layers.11.mlp.experts.3.w1", "transformer.h.7.attn.c_attn", "a.b.3",
    "a.3.b", "a.b.3.c", "a.b..3.c", "a.b.03.c", "a\n.b.3.c", "a.b\n.3.c", "a.b.\u0661.c", "a.b.3x.c", "a.b.c.d.4.e",
    "", "a", "a.b", ".b.3.c", "a.b.3.", "a.b.-3.c", "a.b. 3.c"])
def test_a_modules_layer_number_is_the_one_pefts_layers_to_transform_finds(module):
    found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)  # peft's, when layers_pattern is not set
    assert layer_index(module) == (int(found["idx"]) if found else None)


def test_patterns_with_repeated_groups_and_lookarounds_are_read_as_peft_reads_them(tmp_path):
    """Patterns are matched in bounded time, so none is refused for its shape: a repeated group goes through RE2, a
    lookahead through Python's re in a child."""
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=5, rank=4, alpha=8, targets=r".*\.(q|v)_proj+",
                           rank_pattern={"(v)+_proj": 2}, alpha_pattern={r"(?<=self_attn\.)q_proj": 3})
    assert_folds_as_pefts_merged_model(tmp_path, base, adapter)


@pytest.mark.timeout(120)
def test_a_config_pattern_that_backtracks_catastrophically_is_matched_quickly_by_the_command(tmp_path):
    """Python's re would take a day to match this target pattern to this module name (2^40 ways to try, no group
    repeated); `mergeops fold` rejects the adapter (its other modules are not targeted) in seconds."""
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    rewrite_weights(adapter, rename_first_pair("a" * 40))
    edit_config(adapter, target_modules="a?" * 40 + "a" * 40)
    policy = write_policy(tmp_path, base, "task_arithmetic")
    folded = subprocess.run([sys.executable, "-m", "mergeops", "fold", str(adapter), "--policy", str(policy)],
                            capture_output=True, text=True, timeout=60)
    assert folded.returncode == 3, folded.stderr
    assert "layers_to_transform do not adapt" in folded.stderr and "Traceback" not in folded.stderr
    with Ledger.open_readonly(load_policy(policy).home) as ledger:
        assert [e["kind"] for e in ledger.events()] == ["checkpoint.rejected"]


def test_mwas_window_re_reads_an_expired_adapter_as_it_was_folded(tmp_path, adapters):
    """The checkpoint leaving the window is re-read from its folder: an adapter is read as base + its update again."""
    base, made, full = adapters
    results = {}
    for kind, checkpoints in (("adapter", made), ("full", full)):
        policy = load_policy(write_policy(tmp_path / kind, base, "mwa", {"window": 2}))
        for checkpoint in checkpoints:
            result = fold_checkpoint(policy, None, checkpoint)
            assert result.status == "merged" and not result.notes, (result.reason, result.notes)
        results[kind] = read_model(result.output)
    assert_close(results["adapter"], results["full"], rtol=1e-6)


def test_an_adapter_may_ship_the_bases_tokenizer_but_no_other(tmp_path):
    """An adapter updates the base's embedding rows by id: a tokenizer with added or moved tokens cannot go with it."""
    from tests.intake.finetunes import word_tokenizer

    words = ["[UNK]", "[PAD]", *(f"w{i}" for i in range(62))]
    base = tiny_base(tmp_path, "llama")
    word_tokenizer(words).save_pretrained(base)
    policy = load_policy(write_policy(tmp_path, base, "task_arithmetic"))
    cases = {"same": word_tokenizer(words), "moved": word_tokenizer([*words[:2], *reversed(words[2:])])}
    cases["added"] = word_tokenizer(words)
    cases["added"].add_tokens(["brand-new"])
    results = {}
    for seed, (name, tokenizer) in enumerate(cases.items(), 1):
        adapter = make_adapter(base, tmp_path / name, seed=seed, targets=["q_proj"])
        tokenizer.save_pretrained(adapter)
        results[name] = fold_checkpoint(policy, None, adapter)
    assert results["same"].status == "merged", results["same"].reason
    for name in ("moved", "added"):
        assert results[name].status == "rejected" and "cannot add or move tokens" in results[name].reason


def test_a_non_finite_factor_is_rejected_before_opcms_factored_projection_sees_it(tmp_path):
    """Where OPCM keeps the sum as factors, a NaN factor would reach its QR and SVD: it is a rejection instead."""
    base = tiny_base(tmp_path, "llama")
    policy = load_policy(write_policy(tmp_path, base, "opcm"))
    good = make_adapter(base, tmp_path / "good", seed=1, targets=["q_proj"])
    assert fold_checkpoint(policy, None, good).status == "merged"
    bad = make_adapter(base, tmp_path / "bad", seed=2, targets=["q_proj"])
    rewrite_weights(bad, lambda t: {n: v.index_fill(0, torch.tensor([0]), float("nan")) if "lora_B" in n else v
                                    for n, v in t.items()})
    result = fold_checkpoint(policy, None, bad)
    assert (result.status, result.gate) == ("rejected", "finite") and "lora_B" in result.reason, result.reason
    with Ledger.open_readonly(policy.home) as ledger:
        assert ledger.head("s").version == 1


def test_a_config_without_lora_alpha_scales_as_peft_does_by_default(tmp_path):
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=3, rank=4, alpha=8, targets=["q_proj"])
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    del config["lora_alpha"]
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    assert_folds_as_pefts_merged_model(tmp_path, base, adapter)


def test_an_adapter_re_saved_with_its_config_reformatted_is_a_duplicate(tmp_path):
    """The same factors and settings: the config's bytes (key order, peft_version) are not the adapter."""
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=3, targets=["q_proj"])
    again = tmp_path / "again"
    shutil.copytree(adapter, again)
    config = json.loads((again / ADAPTER_CONFIG).read_text())
    (again / ADAPTER_CONFIG).write_text(json.dumps(dict(reversed(config.items())) | {"peft_version": "0.99"}))
    policy = load_policy(write_policy(tmp_path, base, "average"))
    assert fold_checkpoint(policy, None, adapter).status == "merged"
    result = fold_checkpoint(policy, None, again)
    assert (result.status, result.version) == ("duplicate", 1), result.reason

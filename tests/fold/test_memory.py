"""A fold's memory: a few pieces of rows and, for OPCM, one singular factor and n×n matrices per projection."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import write_model
from tests.fold.streams import CONFIG, write_policy

EMBEDDING = (16384, 2048)  # the largest tensor: 128 MiB in float32, never projected by OPCM
HEAD = (16384, 1024)  # projected by OPCM: 64 MiB in float32
LINEAR = (512, 512)  # projected by OPCM: 1 MiB in float32
LAYERS = 4

_FOLD = """
import json, resource, sys
from mergeops.allocator import tune_allocator
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy

tune_allocator()  # as the `mergeops` command runs

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

policy = load_policy(sys.argv[1])
fold_checkpoint(policy, "s", sys.argv[2])  # t = 1 warms up imports and buffers
before = rss_kib()
result = fold_checkpoint(policy, "s", sys.argv[3])
assert result.status == "merged", result.reason
with open("/proc/self/status") as f:  # VmHWM is this process's own peak
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"growth_mib": (peak - before) / 1024}))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(EMBEDDING, generator=g).to(torch.bfloat16),
            "lm_head.weight": torch.randn(HEAD, generator=g).to(torch.bfloat16)}
    for i in range(LAYERS):
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(LINEAR, generator=g).to(torch.bfloat16)
    paths = [write_model(root / "base", base, config=CONFIG)]
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        tuned = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        paths.append(write_model(root / f"ck{seed}", tuned, config=CONFIG))
    return root, paths


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("method", "bound_mib", "what"), [
    ("task_arithmetic", 48, "3/8 of the largest tensor: elementwise folds stream pieces"),
    ("opcm", 192, "3× the head: its 64 MiB left singular factor, two projections' float64 blocks and n×n matrices, "
                  "and a few pieces (holding each projected tensor's update, base, sum and U whole grew 584 MiB)"),
])
def test_peak_memory_of_a_fold_stays_far_below_one_float32_copy_of_the_model(models, method, bound_mib, what):
    root, (base, first, second) = models
    policy = write_policy(root / method, base, method)
    result = subprocess.run([sys.executable, "-c", _FOLD, str(policy), str(first), str(second)],
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout)["growth_mib"]
    model_mib = (EMBEDDING[0] * EMBEDDING[1] + HEAD[0] * HEAD[1] + LAYERS * LINEAR[0] * LINEAR[1]) * 4 / 2**20
    assert growth < bound_mib, f"{method}: RSS grew {growth:.0f} MiB folding a {model_mib:.0f} MiB (float32) model, " \
                               f"more than {what}"

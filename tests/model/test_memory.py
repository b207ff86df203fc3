"""Reading a model tensor by tensor keeps memory near the largest tensor, not the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mergeops.model import ModelWriter, TensorSpec

TENSOR_SHAPE = (2560, 4096)  # 40 MiB in float32
TENSORS = 12  # 480 MiB in all

_MEASURE = """
import json, resource, sys
from mergeops.intake.inspect import inspect_folder
from mergeops.model import ModelFolder

def current_rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

before = current_rss_kib()
if sys.argv[2] == "read":
    total = 0.0
    with ModelFolder.open(sys.argv[1]) as model:
        for name, tensor in model.iter_tensors():
            total += float(tensor.float().sum())
else:
    assert inspect_folder(sys.argv[1]).problems == []
# VmHWM is this process's own peak; ru_maxrss would include the parent's RSS at fork time.
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"growth_mib": (peak - before) / 1024}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "m"
    specs = [TensorSpec(f"layer.{i}.weight", torch.float32, TENSOR_SHAPE) for i in range(TENSORS)]
    with ModelWriter(path, specs, shard_bytes=100 << 20) as writer:
        for spec in specs:
            writer.write(spec.name, torch.randn(TENSOR_SHAPE))
    return path


@pytest.mark.parametrize("mode", ["read", "inspect"])
def test_peak_rss_growth_is_bounded_by_the_largest_tensor(big_model, mode):
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(big_model), mode], capture_output=True,
                            text=True, check=True, timeout=120)
    growth = json.loads(result.stdout)["growth_mib"]
    largest_mib = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 4 / 2**20
    model_mib = largest_mib * TENSORS
    assert growth < 3 * largest_mib + 32, f"RSS grew {growth:.0f} MiB reading a {model_mib:.0f} MiB model"
    assert growth < model_mib / 3

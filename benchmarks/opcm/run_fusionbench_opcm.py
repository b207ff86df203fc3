#!/usr/bin/env python
"""Run FusionBench's own OPCM (fusion_bench.method.opcm.opcm_general.OPCM, stock: it always zeroes the
diagonal, i.e. mergeops' zero_diagonal = true) on flat safetensors model folders.

Runs in the FusionBench virtualenv (benchmarks/opcm/setup_fusionbench.sh), not with mergeops:

    /work/venvs/fusionbench/bin/python benchmarks/opcm/run_fusionbench_opcm.py \
        --base BASE_DIR CKPT1_DIR CKPT2_DIR ... --alpha 0.5 --out merged.safetensors

A folder holds model.safetensors, or shards listed in model.safetensors.index.json. A module tree is
built from the dotted tensor names: a leaf group `P.weight` (2-D) [+ `P.bias`] whose path does not match
--no-project-regex becomes an nn.Linear, which is what FusionBench SVD-projects; any other group becomes a
plain leaf module holding parameters (FusionBench adds τ_t unchanged). No network, dataset, taskpool or
logger is involved. Prints one JSON line (last line of stdout): per-step load and merge wall time from
FusionBench's own profiler sections, total time, and peak RSS (VmHWM of this process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L
import torch
from fusion_bench.method.opcm.opcm_general import OPCM
from fusion_bench.modelpool import BaseModelPool
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

INDEX_FILE = "model.safetensors.index.json"


def vmhwm_kib() -> int:
    """Peak resident set size of this process (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def load_state(folder: Path, dtype: torch.dtype) -> OrderedDict[str, Tensor]:
    """All tensors of a model folder (single file or sharded), cast to ``dtype``."""
    index = folder / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state: OrderedDict[str, Tensor] = OrderedDict()
    for file in files:
        for name, tensor in load_file(folder / file).items():
            if not tensor.is_floating_point():
                raise SystemExit(f"{folder}: tensor {name} is {tensor.dtype}; only floating tensors are supported")
            state[name] = tensor.to(dtype)
    return state


class Holder(nn.Module):
    """A container or plain leaf module; parameters and children are attached by name."""


def build_module(state: OrderedDict[str, Tensor], no_project: re.Pattern[str]) -> nn.Module:
    """A module tree whose named_parameters() are exactly the state dict's names."""
    groups: OrderedDict[str, OrderedDict[str, Tensor]] = OrderedDict()
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        groups.setdefault(prefix, OrderedDict())[leaf] = tensor
    root = Holder()

    def module_at(path: str) -> nn.Module:
        module = root
        for part in path.split(".") if path else []:
            if part not in module._modules:
                module.add_module(part, Holder())
            module = module._modules[part]
        return module

    for prefix in sorted(groups, key=lambda p: p.count(".") + bool(p)):  # parents before children
        tensors = groups[prefix]
        weight, bias = tensors.get("weight"), tensors.get("bias")
        linear = (bool(prefix) and weight is not None and weight.dim() == 2 and set(tensors) <= {"weight", "bias"}
                  and (bias is None or bias.shape == weight.shape[:1]) and not no_project.search(prefix))
        if linear:
            parent, _, last = prefix.rpartition(".")
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            module.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(bias, requires_grad=False)
            module_at(parent).add_module(last, module)
        else:
            holder = module_at(prefix)
            for leaf, tensor in tensors.items():
                holder.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    if sorted(n for n, _ in root.named_parameters()) != sorted(state):
        raise SystemExit("the module tree does not reproduce the tensor names")
    return root


def classify(model: nn.Module) -> dict[str, int]:
    """How FusionBench treats each parameter: projected, plain addition, or never merged."""
    counts = {"projected": 0, "plain": 0, "unmerged": 0}
    for _, module in model.named_modules():
        leaf = not any(True for _ in module.children())
        for name, _ in module.named_parameters(recurse=False):
            kind = "unmerged" if not leaf else "projected" if isinstance(module, nn.Linear) and name == "weight" \
                else "plain"
            counts[kind] += 1
    return counts


class FolderPool(BaseModelPool):
    """A model pool of folders ('_pretrained_' = base, then the checkpoints in merge order)."""

    def __init__(self, base: Path, checkpoints: list[Path], dtype: torch.dtype, no_project: re.Pattern[str]):
        self._dtype, self._no_project = dtype, no_project
        models = {"_pretrained_": str(base)} | {f"task_{i:04d}": str(c) for i, c in enumerate(checkpoints, 1)}
        super().__init__(models=models)

    def load_model(self, model_name_or_config: str, *args: object, **kwargs: object) -> nn.Module:
        return build_module(load_state(Path(self._models[model_name_or_config]), self._dtype), self._no_project)


class TimedOPCM(OPCM):
    """Stock FusionBench OPCM; only records the wall time of each of its own profiler sections."""

    sections: list[tuple[str, float]]

    @contextmanager
    def profile(self, action_name: str) -> Iterator[str]:
        start = time.perf_counter()
        with super().profile(action_name):
            yield action_name
        self.sections.append((action_name, time.perf_counter() - start))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="base model folder")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint folders, in merge order")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="dtype the models are loaded in; FusionBench computes in the parameter dtype")
    parser.add_argument("--no-project-regex", default="embed", help="module paths never built as nn.Linear")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    pool = FolderPool(args.base, args.checkpoints, dtype, re.compile(args.no_project_regex))
    algo = TimedOPCM(alpha=args.alpha, shuffle_order=False, seed=None, save_on_every_step=False,
                     evaluate_on_every_step=False, num_ray_actors=0)
    algo.sections = []
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)  # no logger: nothing is saved or logged

    rss_before = vmhwm_kib()
    start = time.perf_counter()
    merged = algo.run(pool)
    run_seconds = time.perf_counter() - start

    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, args.out)
    save_seconds = time.perf_counter() - start

    loads = [s for name, s in algo.sections if name == "loading model"]  # base, θ_1, then θ_t for t ≥ 2
    merges = [s for name, s in algo.sections if name == "merging model"]  # t ≥ 2
    steps = [{"t": t, "load_s": load, "merge_s": merge} for t, load, merge in zip(
        range(2, len(args.checkpoints) + 1), loads[2:], merges, strict=True)]
    print(json.dumps({
        "tool": "fusion_bench.method.opcm.opcm_general.OPCM", "fusion_bench": version("fusion-bench"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype, "alpha": args.alpha,
        "checkpoints": len(args.checkpoints), "modules": classify(merged),
        "load_base_and_first_s": sum(loads[:2]), "steps": steps, "run_s": run_seconds, "save_s": save_seconds,
        "vmhwm_kib": vmhwm_kib(), "vmhwm_before_run_kib": rss_before,
        "task_vector_norms": [float(n) for n in algo.all_task_vector_norm],
    }))


if __name__ == "__main__":
    main()

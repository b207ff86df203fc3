"""Publishing a version as a LoRA adapter (`mergeops publish --as-adapter RANK`): size, time, error, peak RSS.

On the ~243M-parameter synthetic Llama of the other benchmarks (bf16, generated into the shared work folder by
benchmarks/perf/perf_common.py, reused if there), two one-checkpoint `average` streams: one folds fine-tune 1 of
perf_common (a rank-4 update on every 2-D tensor plus dense noise a tenth its size: a low-rank version), the other a
fine-tune whose update is dense Gaussian noise of the same scale on every tensor (a dense version). Each version is
published as an adapter at every --ranks, each publish a fresh `mergeops publish --json` process (wall time spawn
to exit, time after imports, its own peak RSS; it copies and checks the version, checks the base's digest, reads
both models twice and writes and signs the adapter). Printed as a Markdown table and written as JSON to --out.

    python benchmarks/adapter_out/adapter_out.py --params 200e6 --ranks 16 64 256
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "perf"))
from perf_common import WORKDIR, build, ensure_keys, markdown, run_fold, run_mergeops, shape_for, write_json

from mergeops.model import ModelFolder, ModelWriter, TensorSpec


def dense_finetune(base: Path, out: Path, scale: float = 0.02) -> Path:
    """Base + Gaussian noise of ``scale`` times each tensor's mean magnitude on every float tensor: full rank."""
    if out.exists():
        return out
    generator = torch.Generator().manual_seed(99)
    with ModelFolder.open(base) as model:
        specs = [TensorSpec(n, i.dtype, i.shape) for n, i in model.tensors.items()]
        with ModelWriter(out, specs, donor=base) as writer:
            for name, tensor in model.iter_tensors():
                t = tensor.float()
                noise = torch.randn(t.shape, generator=generator) * (scale * (float(t.abs().mean()) or 1.0))
                writer.write(name, (t + noise).to(tensor.dtype))
    return out


def stream(home: Path, base: Path, checkpoint: Path, signing_key: Path) -> Path:
    """A one-stream policy in ``home`` with one version folded from ``checkpoint`` (reused when already there)."""
    policy = home / "policy.toml"
    if not (home / "out" / "v0001").exists():
        home.mkdir(parents=True, exist_ok=True)
        policy.write_text(f'home = "state"\n[keys]\nsigning = "{signing_key}"\n[streams.s]\nbase = "{base}"\n'
                          f'method = "average"\noutput = "out"\n[streams.s.publish]\nto = "published"\n')
        run_fold(checkpoint, policy)
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=200e6)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/adapter_out/runs/adapter_out.json"))
    args = parser.parse_args()
    shape = shape_for(args.params)
    base, (low_rank,) = build(args.workdir, shape, 1)
    dense = dense_finetune(base, args.workdir / f"ck-{shape.parameters}-dense")
    key = ensure_keys(args.workdir)
    rows, results = [], []
    for label, checkpoint in (("low-rank", low_rank), ("dense", dense)):
        home = args.workdir / f"adapter-out-{shape.parameters}-{label}"
        policy = stream(home, base, checkpoint, key)
        for rank in args.ranks:
            published = home / "published" / f"v0001-lora-r{rank}"
            if published.exists():  # a previous run's: publish it again from scratch
                shutil.rmtree(published)
            run = run_mergeops(["publish", "--policy", str(policy), "--as-adapter", str(rank), "--json"])
            assert run.result is not None
            size = (published / "adapter_model.safetensors").stat().st_size
            adapter = run.result["adapter"]
            errors = [t["error"] for t in adapter["tensors"].values()]
            results.append({"version": label, "rank": rank, "bytes": size, "wall_s": run.wall,
                            "after_imports_s": run.seconds, "peak_rss_mib": run.peak_mib, "error": adapter["error"],
                            "max_tensor_error": max(errors), "not_carried": adapter["not_carried"],
                            "exact": len(adapter["exact"])})
            rows.append([label, rank, f"{size / 2**20:.0f}", f"{run.wall:.1f}", f"{run.seconds:.1f}",
                         f"{run.peak_mib:.0f}", f"{adapter['error']:.4f}", f"{max(errors):.4f}"])
            print(rows[-1], flush=True)
    print(f"{shape.parameters:,} parameters, bf16; adapter factors float32")
    print(markdown(["version", "rank", "adapter MiB", "wall s", "after imports s", "peak RSS MiB", "overall error",
                    "worst tensor error"], rows))
    write_json(args.out, {"parameters": shape.parameters, "results": results})


if __name__ == "__main__":
    main()

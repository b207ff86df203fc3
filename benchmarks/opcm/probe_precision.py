#!/usr/bin/env python
"""Why mergeops and FusionBench OPCM (zero_diagonal = true) differ by more than 1e-5 in float32.

1. Runs mergeops' own OPCM method class (mergeops.fold.methods.opcm.OPCM: fold → finish → merged, the
   calls the fold engine makes, here in memory) over base + ckpt1..N in float64 and in float32, for
   zero_diagonal true and false, and compares with FusionBench's float64 output (--fb64, written by
   bench_opcm.py --fb-float64). Same formula ⇒ float64 agreement near 1e-12; the float32-vs-float64
   column is then the rounding error any float32 implementation carries.
2. For step t = 2 (S = τ_1, update τ_2), per projected tensor: D = project_update(S, τ_2) in float64, again
   after one float32 rounding of S (S·(1 + u·ξ), u = 2⁻²⁴, ξ = ±1), and all in float32; with the smallest
   relative gap between consecutive singular values of S beyond the protected rank r. The diagonal
   coefficients u_iᵀ τ v_i (i ≥ r) are defined only up to rotations inside clusters of near-equal σ_i.

    python3 benchmarks/opcm/probe_precision.py MODELS_DIR [--n 4] [--fb64 merged.safetensors] [--limit 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergeops.fold.methods.base import Arrival, Piece
from mergeops.fold.methods.opcm import OPCM, project_update, projection_rank
from mergeops.model import InMemory, ModelFolder


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def merge(base: dict[str, torch.Tensor], checkpoints: list[dict[str, torch.Tensor]], alpha: float,
          zero_diagonal: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """mergeops' OPCM over the sequence, in ``dtype``, exactly as the engine calls it per tensor."""
    params = OPCM.check_params({"alpha": alpha, "zero_diagonal": zero_diagonal}, "probe")
    scalars: dict = {}
    state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in base}
    for t, checkpoint in enumerate(checkpoints, 1):
        method = OPCM(params, scalars)
        method.begin(Arrival(checkpoint=None, resolve_digest=str, t=t))  # type: ignore[arg-type]  # OPCM reads only t
        state = {n: fold(method, n, base[n].to(dtype), checkpoint[n].to(dtype, copy=True), state[n]) for n in base}
        method.finish()
        scalars = method.scalars
    return {n: method.merged(Piece(n, 0, base[n].numel()), base[n].to(dtype), state[n]) for n in base}


def fold(method: OPCM, name: str, base: torch.Tensor, new: torch.Tensor,
         state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tensor's fold as the engine runs it: prepare (the projection), then fold, here on whole tensors."""
    prepared = method.prepare(name, InMemory(base), InMemory(new), {k: InMemory(v) for k, v in state.items()})
    removal = None if prepared is None else prepared.read().reshape(new.shape)
    return method.fold(Piece(name, 0, new.numel()), base, new, state, removal)


def max_rel_tv(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> str:
    """max over tensors of max|ours − ref| / max|ref − θ0|, and the tensor."""
    value, name = max((rel(ours[n] - base[n].double(), ref[n].double() - base[n].double()), n) for n in base)
    return f"{value:.2e} ({name})"


def load(folder: Path) -> dict[str, torch.Tensor]:
    with ModelFolder.open(folder) as model:
        return {name: tensor.float() for name, tensor in model.iter_tensors()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, help="folder with base/, ckpt1/ ... (bench_opcm.py's cache)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--fb64", type=Path, help="FusionBench's float64 merge of the same sequence")
    parser.add_argument("--limit", type=int, default=8, help="step-2 table: the first N projected tensors")
    args = parser.parse_args()
    base = load(args.models / "base")
    checkpoints = [load(args.models / f"ckpt{i}") for i in range(1, args.n + 1)]

    print(f"### 1. Whole sequence ({args.models}, N = {args.n}, alpha = {args.alpha}): max over tensors of "
          "max|Δ| / max|ref − θ0|\n")
    print("| zero_diagonal | mergeops code float64 vs FusionBench float64 | mergeops code float32 vs float64 |")
    print("|---|---|---|")
    fb64 = load_file(args.fb64) if args.fb64 else None
    for zero_diagonal in (True, False):
        exact = merge(base, checkpoints, args.alpha, zero_diagonal, torch.float64)
        single = merge(base, checkpoints, args.alpha, zero_diagonal, torch.float32)
        versus_fb = max_rel_tv(exact, fb64, base) if fb64 is not None and zero_diagonal else "—"
        print(f"| {str(zero_diagonal).lower()} | {versus_fb} | {max_rel_tv(single, exact, base)} |")

    print("\n### 2. Step t = 2, per tensor: max|ΔD| / max|D| against float64\n")
    print("| tensor | shape | r | min gap (σ_i − σ_{i+1}) / σ_1, i ≥ r | zero_diagonal | S rounded once to float32 "
          "| all in float32 |")
    print("|---|---|---|---|---|---|---|")
    method = OPCM(OPCM.check_params({}, "probe"), {})
    generator = torch.Generator().manual_seed(0)
    names = [n for n, x in base.items() if method.is_projected(n, tuple(x.shape))][: args.limit]
    for name in names:
        s32, tau32 = checkpoints[0][name] - base[name], checkpoints[1][name] - base[name]
        s, tau = s32.double(), tau32.double()
        perturbed = s * (1 + 2.0**-24 * (torch.randint(0, 2, s.shape, generator=generator) * 2 - 1))
        sigma = torch.linalg.svdvals(s)
        r = projection_rank(sigma, args.alpha)
        gap = float((sigma[r:-1] - sigma[r + 1:]).min() / sigma[0]) if sigma.numel() - r > 1 else float("nan")
        for zero_diagonal in (True, False):
            exact = project_update(s, tau.clone(), args.alpha, zero_diagonal)  # it overwrites its τ
            rounded = rel(project_update(perturbed, tau.clone(), args.alpha, zero_diagonal), exact)
            single = rel(project_update(s32, tau32.clone(), args.alpha, zero_diagonal), exact)
            print(f"| {name} | {tuple(s.shape)} | {r} | {gap:.1e} | {str(zero_diagonal).lower()} | {rounded:.1e} | "
                  f"{single:.1e} |")


if __name__ == "__main__":
    main()

"""Batch reference implementations of SPEC §4, written independently of the package, in float64.

Each takes the base and all checkpoints (dicts of floating tensors) and returns the merged model.
"""

from __future__ import annotations

import math
import re

import torch

Model = dict[str, torch.Tensor]


def _f64(model: Model) -> Model:
    return {n: t.double() for n, t in model.items() if t.dtype.is_floating_point}


def _taus(base: Model, checkpoints: list[Model]) -> list[Model]:
    b = _f64(base)
    return [{n: c[n].double() - b[n] for n in b} for c in checkpoints]


def average(base: Model, checkpoints: list[Model]) -> Model:
    b = _f64(base)
    return {n: sum(c[n].double() for c in checkpoints) / len(checkpoints) for n in b}


def task_arithmetic(base: Model, checkpoints: list[Model], lam: float) -> Model:
    b = _f64(base)
    taus = _taus(base, checkpoints)
    return {n: b[n] + lam * sum(t[n] for t in taus) for n in b}


def magmax(base: Model, checkpoints: list[Model], lam: float) -> Model:
    b = _f64(base)
    out = {}
    for n in b:
        stack = torch.stack([t[n] for t in _taus(base, checkpoints)])
        index = stack.abs().argmax(dim=0, keepdim=True)  # first maximum: the earliest checkpoint wins ties
        out[n] = b[n] + lam * stack.gather(0, index)[0]
    return out


def _topk_mask(flat: torch.Tensor, density: float) -> torch.Tensor:
    d = flat.numel()
    k = d - int(d * density)
    if k <= 0:
        return torch.ones_like(flat, dtype=torch.bool)
    threshold = flat.abs().kthvalue(k).values
    return flat.abs() >= threshold


def ties(base: Model, checkpoints: list[Model], lam: float, density: float) -> Model:
    b = _f64(base)
    names = list(b)
    taus = [torch.cat([t[n].reshape(-1) for n in names]) for t in _taus(base, checkpoints)]
    m = lam * taus[0]
    for tau in taus[1:]:
        tm, tt = m * _topk_mask(m, density), tau * _topk_mask(tau, density)
        sign = torch.sign(tm + tt)
        m = m + lam * (tm * (tm * sign > 0) + tt * (tt * sign > 0))
    out, offset = {}, 0
    for n in names:
        size = b[n].numel()
        out[n] = b[n] + m[offset:offset + size].reshape(b[n].shape)
        offset += size
    return out


DEFAULT_NOT_LINEAR = re.compile(r"embed|wte|wpe|position|token_type|shared")


def default_projected(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name.endswith(".weight") and not DEFAULT_NOT_LINEAR.search(name)


def project_update(s: torch.Tensor, tau: torch.Tensor, alpha: float, zero_diagonal: bool,
                   diagonal_rank: int | None = None) -> torch.Tensor:
    """τ with its coefficients in S's top-r singular block (and the diagonal, or its first ``diagonal_rank``
    entries) removed, by full SVD."""
    u, sigma, vh = torch.linalg.svd(s, full_matrices=True)
    share = torch.cumsum(sigma, 0) / sigma.sum()
    r = int((share <= alpha).sum())
    c = u.T @ tau @ vh.T
    mask = torch.zeros_like(c, dtype=torch.bool)
    mask[:r, :r] = True
    if zero_diagonal:
        k = min(c.shape) if diagonal_rank is None else diagonal_rank
        mask[range(k), range(k)] = True
    return tau - u @ (c * mask) @ vh


def opcm(base: Model, checkpoints: list[Model], alpha: float, zero_diagonal: bool,
         projected=default_projected) -> Model:
    b = _f64(base)
    taus = _taus(base, checkpoints)
    norm = lambda model: math.sqrt(sum(float(t.square().sum()) for t in model.values()))  # noqa: E731
    s = dict(taus[0])
    norms = [norm(taus[0])]
    for tau in taus[1:]:
        norms.append(norm(tau))
        for n in b:
            if not projected(n, b[n]) or not bool(s[n].any()):
                s[n] = s[n] + tau[n]
                continue
            s[n] = s[n] + project_update(s[n], tau[n], alpha, zero_diagonal)
    scale = (sum(norms) / len(norms)) / norm(s)
    return {n: b[n] + scale * s[n] for n in b}


def ota(base: Model, checkpoints: list[Model], curvatures: list[Model], *, power: float = 0.5,
        epsilon: float = 1e-12, density: float | None = None, rank1: bool = False, fallback: str = "base",
        multipliers: list[float] | None = None) -> Model:
    b = _f64(base)
    taus = _taus(base, checkpoints)
    multipliers = multipliers or [1.0] * len(checkpoints)
    numerator = {n: torch.zeros_like(b[n]) for n in b}
    denominator = {n: torch.zeros_like(b[n]) for n in b}
    for tau, v_model, mult in zip(taus, curvatures, multipliers, strict=True):
        v = {n: v_model[n].double() for n in b}
        if rank1:
            v = {n: torch.outer(t.sum(1), t.sum(0)) / t.sum() if t.dim() == 2 else t for n, t in v.items()}
        keep = {n: torch.ones_like(b[n], dtype=torch.bool) for n in b}
        if density is not None:
            saliency = torch.cat([(v[n] * tau[n].square()).reshape(-1) for n in b])
            k = math.ceil(density * saliency.numel())
            threshold = saliency.sort(descending=True).values[k - 1]
            keep = {n: v[n] * tau[n].square() >= threshold for n in b}
        for n in b:
            c = v[n] ** power
            w = (c + epsilon * float(c.mean())) * keep[n] * mult
            numerator[n] += w * tau[n]
            denominator[n] += w
    out = {}
    for n in b:
        mean_tau = sum(t[n] for t in taus) / len(taus)
        fill = mean_tau if fallback == "mean" else torch.zeros_like(b[n])
        safe = torch.where(denominator[n] > 0, denominator[n], 1.0)
        out[n] = b[n] + torch.where(denominator[n] > 0, numerator[n] / safe, fill)
    return out


def weighted_average(base: Model, checkpoints: list[Model], weights: list[float]) -> Model:
    b = _f64(base)
    total = sum(weights)
    return {n: sum(w * c[n].double() for w, c in zip(weights, checkpoints, strict=True)) / total for n in b}


def _dare_taus(base: Model, checkpoints: list[Model], density: float, seed: int) -> list[Model]:
    """DARE(τ_t) of every checkpoint, with the package's position-keyed draw (the one part taken from it)."""
    from mergeops.fold.methods.base import Piece
    from mergeops.fold.methods.parts import uniform_by_position

    def kept(name: str, t: int) -> torch.Tensor:
        draw = uniform_by_position(f"dare:{seed}:{t}:{name}", Piece(name, 0, base[name].numel()))
        return (draw < density).reshape(base[name].shape).double()

    b = _f64(base)
    return [{n: (c[n].double() - b[n]) * kept(n, t) / density for n in b} for t, c in enumerate(checkpoints, 1)]


def dare(base: Model, checkpoints: list[Model], lam: float, density: float, seed: int) -> Model:
    """θ0 + λ Σ DARE(τ_t)."""
    dropped = _dare_taus(base, checkpoints, density, seed)
    return {n: t + lam * sum(d[n] for d in dropped) for n, t in _f64(base).items()}


def dare_ties(base: Model, checkpoints: list[Model], lam: float, density: float, seed: int) -> Model:
    """Continual TIES without trimming, over DARE(τ_t): m_1 = λ d_1; m_t = m + λ (the entries of m and d_t agreeing
    with the sign of m + d_t)."""
    dropped = _dare_taus(base, checkpoints, density, seed)
    m = {n: lam * d for n, d in dropped[0].items()}
    for d in dropped[1:]:
        m = {n: m[n] + lam * _agreeing(m[n], d[n]) for n in m}
    return {n: t + m[n] for n, t in _f64(base).items()}


def _agreeing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sign = torch.sign(a + b)
    return a * (a * sign > 0) + b * (b * sign > 0)

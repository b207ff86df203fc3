"""A merge method driven through its protocol in memory, as the engine drives it on disk: no folders, no ledger."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from mergeops.fold.methods import METHODS
from mergeops.fold.methods.base import Arrival, PastCheckpoint, Piece
from mergeops.model import InMemory, ModelFolder, piece_bounds

Model = dict[str, torch.Tensor]


def fold_in_memory(method: str, params: dict, base: Model, checkpoints: list[Model], *,
                   metrics: list[dict[str, float]] | None = None, folders: list[Path] | None = None) -> Model:
    """Fold ``checkpoints`` one at a time with ``method`` and return the merged model (float32). ``folders``: each
    checkpoint written as a model folder, with its extra files (OTA's curvature); ``metrics``: each checkpoint's
    training metrics."""
    cls = METHODS[method]
    checked = cls.check_params(params, "test")
    state: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict = {}
    history: list[PastCheckpoint] = []
    merged: Model = {}
    for t, checkpoint in enumerate(checkpoints, 1):
        where = folders[t - 1] if folders else Path(f"checkpoint-{t}")
        found = metrics[t - 1] if metrics else {}
        instance = cls(checked, scalars)
        digest = f"sha256:{t:064d}"
        folder = ModelFolder.open(where) if folders else None
        # the checkpoint as the engine hands it over: where it is, and (OTA checks its curvature against) the base's
        # tensors, which its own are named and shaped like
        view = SimpleNamespace(path=where, base=folder)
        instance.begin(Arrival(view, lambda d=digest: d, t=t, metrics=found, history=tuple(history)))  # type: ignore[arg-type]
        while (see := instance.survey()) is not None:
            for name in base:
                old = {k: v.clone() for k, v in state.get(name, {}).items()}
                see(name, base[name].float(), checkpoint[name].float().clone(), old)  # a method may work in place
        new_state = {}
        for name, tensor in base.items():
            old = state.get(name, {})
            prepared = instance.prepare(name, InMemory(tensor), InMemory(checkpoint[name]),
                                        {k: InMemory(v) for k, v in old.items()})
            pieces = []
            for start, stop in piece_bounds(tuple(tensor.shape)):
                piece = Piece(name, start, stop)
                flat = {k: v.reshape(-1)[start:stop].clone() for k, v in old.items()}
                pieces.append(instance.fold(piece, tensor.reshape(-1)[start:stop].float(),
                                            checkpoint[name].reshape(-1)[start:stop].float().clone(), flat,
                                            prepared.piece(start, stop) if prepared is not None else None))
            new_state[name] = {k: torch.cat([p[k] for p in pieces]).reshape(tensor.shape) for k in pieces[0]}
        instance.finish()
        state, scalars = new_state, instance.scalars
        merged = {name: torch.cat([instance.merged(Piece(name, a, b), tensor.reshape(-1)[a:b].float(),
                                                   {k: v.reshape(-1)[a:b] for k, v in state[name].items()})
                                   for a, b in piece_bounds(tuple(tensor.shape))]).reshape(tensor.shape)
                  for name, tensor in base.items()}
        instance.close()
        if folder is not None:
            folder.close()
        history.append(PastCheckpoint(digest, where, found))
    return merged

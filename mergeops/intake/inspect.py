"""`mergeops inspect`: a model folder's identity, contents and problems, reading each byte once."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeops.errors import ModelFolderError
from mergeops.intake.validate import tensor_value_problem
from mergeops.model import ModelFolder, Problem
from mergeops.model.adapter import Adapter
from mergeops.model.digest import digest_of_listing, folder_file_hashes
from mergeops.model.finetune import scan_checkpoint


@dataclass
class InspectReport:
    path: Path
    digest: str | None = None
    parameters: int = 0
    tensors: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    architecture: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    adapter: dict[str, Any] | None = None  # a LoRA adapter: Adapter.describe()

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "digest": self.digest, "parameters": self.parameters,
                "tensors": self.tensors, "dtypes": self.dtypes, "architecture": self.architecture,
                "files": self.files, "problems": [p.to_json() for p in self.problems], "adapter": self.adapter}


def inspect_folder(path: str | Path, progress: Callable[[int], None] | None = None) -> InspectReport:
    """Validate ``path`` (a model folder or a LoRA adapter) and describe it. Every weight file is read once: each
    tensor is checked while the same bytes feed the file's sha256. ``progress`` is called with byte counts as they
    are read."""
    report = InspectReport(Path(path))
    weights, report.problems = scan_checkpoint(path)
    if weights is None or any(p.code == "path_escape" for p in report.problems):
        return report  # never hash (or read) files that lie outside the folder
    if isinstance(weights, Adapter):
        report.adapter = weights.describe()
        folder: ModelFolder = weights.folder
    else:
        folder = weights
    with folder:
        if not any(p.code == "bad_config" for p in report.problems):  # scan reported a bad config already
            report.architecture = folder.architecture
        known_hashes = {}
        for shard in folder.headers:
            hasher = hashlib.sha256()

            def feed(chunk: bytes | memoryview, hasher: Any = hasher) -> None:
                hasher.update(chunk)
                if progress:
                    progress(len(chunk))

            for name, tensor in folder.iter_file(shard, feed):
                problem = tensor_value_problem(name, tensor, shard)
                if problem:
                    report.problems.append(problem)
            known_hashes[shard] = hasher.hexdigest()
        infos = folder.tensors.values()
        report.tensors = len(folder.tensors)
        report.parameters = sum(t.numel for t in infos)
        report.dtypes = dict(sorted(Counter(t.entry.dtype for t in infos).items()))
        try:
            hashes = folder_file_hashes(folder.path, known_hashes, progress)
        except ModelFolderError as exc:
            report.problems.append(Problem("path_escape", str(exc)))
            return report
    report.digest = digest_of_listing(hashes)
    report.files = [{"name": name, "size": (folder.path / name).stat().st_size, "sha256": sha}
                    for name, sha in hashes.items()]
    return report

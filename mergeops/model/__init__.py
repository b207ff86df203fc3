"""Model folders on disk: read one tensor at a time, write atomically, compute the digest."""

from mergeops.model.digest import folder_digest, folder_file_hashes
from mergeops.model.folder import InMemory, ModelFolder, Pieces, StoredTensor, TensorInfo, piece_bounds
from mergeops.model.problems import Problem
from mergeops.model.writer import DEFAULT_SHARD_BYTES, ModelWriter, TensorSpec

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "InMemory",
    "ModelFolder",
    "ModelWriter",
    "Pieces",
    "Problem",
    "StoredTensor",
    "TensorInfo",
    "TensorSpec",
    "folder_digest",
    "folder_file_hashes",
    "piece_bounds",
]

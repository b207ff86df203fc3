"""The fuzz suite's fixed budget and seed: every CI run draws the same examples, so a failure reproduces.

``MERGEOPS_FUZZ_SCALE`` multiplies every test's budget for a longer local campaign (the seed stays fixed unless
``MERGEOPS_FUZZ_SEED`` names another one)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from mergeops.keys import generate_keys
from mergeops.synthetic import LlamaShape, write_adapter, write_base, write_finetune

SCALE = float(os.environ.get("MERGEOPS_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("MERGEOPS_FUZZ_SEED", "20261207"))
settings.register_profile("mergeops-fuzz", derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])


def budget(examples: int) -> settings:
    """The fixed settings of one fuzz test: ``examples`` examples (times the scale), derandomized, no deadline."""
    return settings(settings.get_profile("mergeops-fuzz"), max_examples=max(1, round(examples * SCALE)))


TINY = LlamaShape(hidden=16, layers=1, intermediate=32, heads=2, kv_heads=1, vocab=32)


@dataclass(frozen=True)
class World:
    """A base, keys, one good fine-tune and one good adapter of it, made once for the whole suite."""

    root: Path
    base: Path
    finetune: Path
    adapter: Path

    def policy(self, folder: Path, method: str = "average", registry: Path | None = None) -> Path:
        """A policy whose home and output live in ``folder`` (a new stream per example)."""
        watch = f'[[streams.s.watch]]\npath = "{registry}"\nsettle_seconds = 0\n' if registry else ""
        text = (f'home = "{folder / "home"}"\n[keys]\nsigning = "{self.root / "keys" / "signing.pem"}"\n'
                f'[streams.s]\nbase = "{self.base}"\nmethod = "{method}"\noutput = "{folder / "out"}"\n{watch}')
        path = folder / "policy.toml"
        path.write_text(text)
        return path

    def copy(self, source: Path, to: Path) -> Path:
        shutil.copytree(source, to, symlinks=True)
        return to


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("fuzz-world")
    base = write_base(root / "base", TINY, seed=0)
    generate_keys(root / "keys")
    # every file the fuzz damages is there to damage: training metrics and a generation config too
    extra = {"metrics.json": '{"loss": 0.5, "step": 10}', "generation_config.json": '{"max_new_tokens": 8}',
             "trainer_state.json": '{"global_step": 10, "log_history": [{"loss": 0.5, "step": 10}]}',
             "README.md": "---\nlicense: apache-2.0\n---\n# a fine-tune\n"}
    return World(root, base, write_finetune(base, root / "finetune", seed=1, extra_files=extra),
                 write_adapter(base, root / "adapter", seed=2, rank=2, alpha=4))

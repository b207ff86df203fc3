"""``mergekit-yaml`` with one bug fixed, run by the mergekit virtualenv's Python (not by ours):

    $MERGEKIT_VENV/bin/python benchmarks/quality/mergekit_yaml.py CONFIG OUT [mergekit-yaml options]

mergekit 0.1.5 cannot merge any BERT model: its BERT architecture lists ``embeddings.position_ids`` as an optional
weight with aliases, and ``MergePlanner.plan_tensor`` checks an optional weight's presence with
``[w_in.name] + (w_in.aliases or [])``, a list plus a tuple (``WeightInfo.aliases`` is a tuple): TypeError. Here
that presence check is done correctly before mergekit's own planner runs (an absent optional weight is skipped, as
mergekit intends; a present one is planned as a required weight). Nothing else of mergekit changes.
"""

from __future__ import annotations

from typing import Any

from mergekit.io.tasks import LoaderCache
from mergekit.plan import MergePlanner
from mergekit.scripts.run_yaml import main

_plan_tensor = MergePlanner.plan_tensor


def plan_tensor(self: MergePlanner, weight: Any, weights_in: list[Any], models: list[Any], cfg_reader: Any) -> Any:
    if weight.optional:
        present = any(name in LoaderCache().get(model).index.tensor_paths
                      for model, w_in in zip(models, weights_in, strict=True)
                      for name in (w_in.name, *(w_in.aliases or ())))
        if not present:
            return None
        weight = weight.model_copy(update={"optional": False})
    return _plan_tensor(self, weight, weights_in, models, cfg_reader)


MergePlanner.plan_tensor = plan_tensor  # type: ignore[method-assign]

if __name__ == "__main__":
    main()

"""Fold stage: stream one checkpoint through a merge method into new state and a merged model folder.

``engine.py`` reads base, checkpoint and state a piece of whole rows at a time and writes the results piece by piece;
``methods/`` holds one file per merge method (the protocol in ``methods/base.py``, shared parts in
``methods/parts.py``); ``topk.py`` finds model-wide magnitude thresholds without holding the model.
"""

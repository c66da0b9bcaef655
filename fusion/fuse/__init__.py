"""Pairwise knowledge fusion (FuseChat): distil each source model into a copy of the pivot
through aligned, fused next-token distributions, then merge the targets in parameter space.

config → resolve → data → represent (reading.py, represent.py) → align + fuse (align.py,
distributions.py, targets.py) → train (packing.py, loss.py, train.py) → merge → evaluate →
report; see :mod:`fusion.fuse.pipeline` and :mod:`fusion.fuse.stages`. The heavy stages work in
chunks of the data (shards.py), spread over torchrun's processes (parallel.py). estimate.py is
the cost model. Nothing here imports torch or transformers at import time.
"""

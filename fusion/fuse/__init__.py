"""Pairwise knowledge fusion (FuseChat): distil each source model into a copy of the pivot
through aligned, fused next-token distributions, then merge the targets in parameter space.

config → resolve → data → represent → align + fuse → train → merge → report; see
:mod:`fusion.fuse.pipeline`. Nothing here imports torch or transformers at import time.
"""

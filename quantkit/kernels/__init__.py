"""Triton kernels, one file per family, each with a plain-torch `*_ref` beside it."""

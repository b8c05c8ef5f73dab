"""Experiment, not a product path: the online R4 as a block-diagonal Sylvester Hadamard (blocks of B) instead of
the full Sylvester x Paley Hadamard of the intermediate size, scored by benchmarks/accuracy_w8a8.py.

Why: compressed-tensors' deterministic `hadamard` transform (what vLLM reads as an online transform) is Sylvester
only, powers of two, applied per block of `head_dim`; a block-diagonal R4 is a matrix that format can describe, the
full 1536 (= 128 x 12) one is not. This swaps the matrix in both places that use it (the fold into down_proj and the
run-time hook) for one run, so the accuracy of that route is known before an R4 block option is built.

    OMP_NUM_THREADS=1 python benchmarks/r4_block_experiment.py 512 --device cpu --samples 32 --seqlen 512 \
        --windows 16 --texts pydoc,code,prose --rows had-online-gptq --no-kv --no-auto
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].isdigit():
        raise SystemExit("usage: r4_block_experiment.py BLOCK [accuracy_w8a8.py options]")
    block = int(sys.argv.pop(1))
    if block & (block - 1):
        raise SystemExit(f"block {block} is not a power of two (Sylvester)")

    import torch

    import quantkit.kernels.hadamard as kh
    from quantkit import api
    from quantkit.quant import rotation as rot

    size = api.load(None).model.config.intermediate_size  # default model only (--model is not read here)
    if size % block:
        raise SystemExit(f"block {block} does not divide the intermediate size {size}")
    h = rot.hadamard_matrix(block)  # Sylvester for a power of two
    r4 = torch.block_diag(*[h / math.sqrt(block)] * (size // block))  # symmetric: x R4 = x R4^T
    full_matrix, full_transform = rot.normalized_hadamard, kh.hadamard_transform

    def normalized_hadamard(n, dtype=torch.float32):
        return r4.to(dtype) if n == size else full_matrix(n, dtype)

    def hadamard_transform(x):
        return (x.float() @ r4.to(x.device)).to(x.dtype) if x.shape[-1] == size else full_transform(x)

    rot.normalized_hadamard = normalized_hadamard  # spinquant folds R4 with this
    kh.hadamard_transform = hadamard_transform  # the R4 hook applies this
    sys.argv = [str(Path(__file__).with_name("accuracy_w8a8.py"))] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()

"""Triton kernels, one file per family, each with a plain-torch `*_ref` beside it.

Families (import the submodule, or use the lazy names below):

* ``act_quant`` -- per-token INT8 activation quantization (``per_token_quant``);
* ``w8a8``      -- INT8 x INT8 GEMM with per-token x per-channel scales (``prepack_w8a8``,
  ``w8a8_linear``);
* ``wna16``     -- W4A16 / W8A16 group-wise GEMM (``prepack_wna16``, ``wna16_linear``);
* ``mixed``     -- per-row INT8/FP16 bitmask GEMM (``mixed_linear``, ``row_precision_bits``);
* ``gptq``      -- one lazy block of the GPTQ solve, fused (``gptq_block_triton``; used by
  ``quantkit.quant.gptq.gptq_quantize(backend="triton")``, not a custom op: calibration only).

``numerics`` (no Triton) holds the definitions the references share with ``quantkit.quant``
(weight scales/zero points, KV scales, Hadamard orders): kernels never import ``quant``.

Every public entry point is a ``torch.library.custom_op`` (``quantkit::...``) with a fake
implementation (torch.compile).  On CPU tensors the torch reference runs, unless
``TRITON_INTERPRET=1`` is set, in which case the Triton kernel runs in Triton's interpreter.
This package imports nothing heavy until a name is used.
"""

from quantkit._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "act_quant": ("per_token_quant", "per_token_quant_ref"),
    "w8a8": ("W8A8Weight", "prepack_w8a8", "w8a8_linear", "w8a8_gemm_q", "w8a8_gemm_ref"),
    "wna16": ("WNA16Weight", "prepack_wna16", "wna16_linear", "wna16_gemm_ref"),
    "mixed": ("mixed_linear", "mixed_gemm_ref", "row_precision_bits", "CTRL_FORCE_FP16", "CTRL_ROW_BITS"),
    "gptq": ("gptq_block_ref", "gptq_block_triton"),
})

"""The quantkit runtime: run exported checkpoints on the Triton kernels (torch references on CPU).

    from quantkit import runtime
    rt = runtime.load("runs/w4g64", device="cuda")       # verifies the manifest, packs every linear
    out = rt.generate([rt.tokenizer.encode("def f(")], max_new_tokens=32)
    rt.precision.force_fp16(sample=0)                      # precision bitmask: layer / sample / tokens
    rt.enable_monitor(...)                                 # online FP16 fallback (see runtime.monitor)

Modules: `loader` (load, from_quantized, from_float), `model` (RuntimeModel: the decoder program,
prefill/decode, CUDA graphs, generate, perplexity), `linear` (QuantLinear), `kvcache` (INT8 KV
cache with residuals), `precision` (the bitmask), `monitor` (the fallback monitor), `calibrate`
(monitor histograms from a calibration pass), `simulate` (torch simulation that `quantkit eval`
uses on dense models). Nothing heavy is imported until a name is used.
"""

from quantkit._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "loader": ("load", "from_quantized", "from_float"),
    "model": ("RuntimeModel",),
    "linear": ("QuantLinear",),
})

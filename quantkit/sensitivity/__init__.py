"""Sensitivity scan: which linears a scheme hurts most, and the file that says so.

`metrics` (pure math), `scan` (the layer-wise pass), `fisher` (gradient-weighted error),
`weights` (what "quantized" means: the scheme's RTN, or GPTQ's weights with `--method gptq`),
`partial` (quantize a subset, score, restore), `select` (--target-fraction: whole fused
units under a budget, chosen on calibration text with cross-validation), `calibrate`
(--measure-ppl ground truth and correlations), `io` (sensitive_layers.json + histogram
sidecar), `report` (table, PNG), `run` (all of it).
"""

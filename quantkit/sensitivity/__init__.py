"""Sensitivity scan: which linears a scheme hurts most, and the file that says so.

`metrics` (pure math), `scan` (the layer-wise pass), `partial` (quantize a subset,
score, restore), `calibrate` (--target-fraction, --measure-ppl), `io`
(sensitive_layers.json + histogram sidecar), `report` (table, PNG), `run` (all of it).
"""

"""`sensitive_layers.json`: the scan's result, read by export and runtime through one loader.

Schema (version 2; version 1 files, without rel_err / restore_gain, still load):

    {"format": "quantkit-sensitive-layers", "version": 2, "quantkit_version": "...",
     "model": {source facts incl. "fingerprint"}, "scheme": Scheme.to_dict(),
     "thresholds": {"kl": 0.02 | null, "R": 15.0 | null, "energy": 0.42 | null,
                    "rel_err": null | float, "fisher": null | float,
                    "mode": "fixed" | "target-fraction", "target_fraction": 0.1 | null},
     "calibration": {source, samples, seqlen, seed, ...},
     "method": {"name": "rtn" | "gptq", "options": {...}},
     "metrics": {what each metric means, bins, histogram range rule},
     "histograms": {"file": "<stem>.hist.safetensors", "bins": 512},
     "ppl": {...} | null, "correlations": {...} | null, "search": [...] | null,
     "layers": [{"layer": 29, "op": "qkv_proj", "name": "model.layers.29.self_attn.q_proj",
                 "flag": "fp16" | "int8" | "int4" | ..., "kl": float, "R": float | null,
                 "energy": float, "skew": float, "clipped": float,
                 "rel_err": float | null, "fisher": float | null,
                 "ppl_delta": float | null, "restore_gain": float | null}]}

With --target-fraction, the flags are whole fused units (q/k/v, gate/up) within the
budget, chosen on calibration text (`quantkit.sensitivity.select`), and "ppl" holds
the selection's perplexities on those windows (baseline, all_quantized, mixed
in-sample), the kept "rule" (alone, restore, greedy, fisher or rel_err) and "rule_why" (the default rule,
or one that did better in every fold: select.pick_rule), "budget", "fp16_linears",
the forward passes ("evaluations"), the selection's wall time ("seconds") and "expected": the cross-validated recovery to
expect on unseen text, with "how" it was measured (and, for a method fit to calibration data,
"method_fit_overlap": the share of the selection windows' text in the method's calibration
samples: an estimate on fitted text runs high; 0 with "cross_fit": true, where each fold was
measured on method weights fit without its windows); "search" lists every rule with its
cross-validated recovery, per-fold choices and final choice. Readers take "rule" and
"search" as data, not as one of these names: an older version-2 file may name the
rules "measured-restore" or a metric.

"method" is what "quantized" means in every measurement (`scan --method`): the scheme's
round-to-nearest, or GPTQ's weights with its resolved options (quantkit.sensitivity.weights);
files without it were measured on RTN weights.

R is null when the inputs' interquartile range is 0 (R infinite). The sidecar
safetensors file holds, per linear, "<name>.hist" (bins,) float32 counts of the
float output and "<name>.range" (2,) float32 [lo, hi]: what the runtime's fallback
monitor compares live activations against.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError, short_repr
from quantkit.files import load_small_json
from quantkit.models.adapter import VLLM_FUSED

FORMAT = "quantkit-sensitive-layers"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added rel_err, fisher, restore_gain and their thresholds (all optional to readers)
_FLAGS_RE = ("fp16", "int2", "int3", "int4", "int8")
_LAYER_KEYS = {"layer": int, "op": str, "name": str, "flag": str, "kl": float, "energy": float, "skew": float}


class SensitiveLayersError(UsageError):
    """sensitive_layers.json is missing, malformed, from another version, or does not fit the model."""


@dataclass(frozen=True)
class SensitiveLayers:
    """A loaded, validated sensitive_layers.json."""

    path: Path
    data: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.data["layers"]

    @property
    def flagged(self) -> list[str]:
        """Names of linears to keep in FP16, in model order."""
        return [e["name"] for e in self.layers if e["flag"] == "fp16"]

    @property
    def scheme(self):
        from quantkit.recipe import Scheme

        return Scheme.from_dict(self.data["scheme"])

    @property
    def method(self) -> str:
        """The method whose weights the scan measured on ("rtn" for files that do not say)."""
        m = self.data.get("method")
        return m.get("name", "rtn") if isinstance(m, dict) else "rtn"

    @property
    def histogram_path(self) -> Path | None:
        h = self.data.get("histograms")
        return self.path.parent / h["file"] if h else None

    def mask(self) -> dict[str, Any]:
        """The JSON-ready mask a checkpoint manifest records."""
        return {
            "source_file": self.path.name,
            "scheme": self.data["scheme"].get("name"),
            "thresholds": self.data["thresholds"],
            "fp16": self.flagged,
            "n_linears": len(self.layers),
        }


# Linears that vLLM fuses into one layer (the adapter table's): all members must share a precision.
FUSED_GROUPS = tuple(VLLM_FUSED.values())


def expand_fused(names: list[str], linears: set[str] | list[str]) -> list[str]:
    """`names` plus their fused siblings (q/k/v, gate/up) that exist in `linears`, in model order.

    vLLM refuses a checkpoint whose q_proj is FP16 while k_proj is quantized, so
    keeping one member in FP16 keeps the whole fused group.
    """
    chosen = set(names)
    present = set(linears)
    for n in names:
        prefix, _, leaf = n.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf in group:
                chosen.update(f"{prefix}.{m}" for m in group if f"{prefix}.{m}" in present)
    return [n for n in linears if n in chosen]


def hist_path_for(json_path: Path) -> Path:
    p = Path(json_path)
    return p.with_name(p.stem + ".hist.safetensors")


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def report_to_dict(report, hist_file: str | None) -> dict[str, Any]:
    """The JSON object for a `ScanReport`."""
    from quantkit import __version__
    from quantkit.sensitivity.scan import RANGE_MARGIN, R_SAMPLE

    return {
        "format": FORMAT,
        "version": VERSION,
        "quantkit_version": __version__,
        "model": report.source,
        "scheme": report.scheme.to_dict(),
        "thresholds": {
            **{k: _finite_or_none(v) for k, v in report.thresholds.to_dict().items()},
            "mode": report.mode,
            "target_fraction": report.target_fraction,
        },
        "calibration": report.calibration,
        "method": report.method,
        "metrics": {
            "kl": f"mean over output channels of KL(P||Q), nats; {report.bins}-bin histograms over one range per layer",
            "R": f"(max - min) / (Q3 - Q1) of the inputs; quartiles of a {R_SAMPLE}-value seeded subsample",
            "energy": "sigma_1^2 / ||W||_F^2 (power iteration on the Gram matrix, float64)",
            "skew": "Pearson's third standardized moment of the float outputs",
            "rel_err": "sum ||yq - y||^2 / sum ||y||^2 of the outputs on the sampled tokens",
            "fisher": "sum (dloss/dy * (yq - y))^2 / tokens over the first fisher_windows calibration samples "
            "(null when not measured)",
            "restore_gain": "ppl(all quantized) - ppl(all quantized but this layer's fused unit) on the "
            "target-fraction selection windows (calibration text); null when not measured",
            "stat_tokens": report.calibration.get("stat_tokens"),
            "range": f"first batch's min/max of float and quantized outputs, +{RANGE_MARGIN:.0%} of the span each side",
            "bins": report.bins,
        },
        "histograms": {"file": hist_file, "bins": report.bins} if hist_file else None,
        "ppl": report.ppl,
        "correlations": report.correlations,
        "search": report.search,
        "seconds": report.seconds,
        "warnings": report.warnings,
        "layers": [
            {
                "layer": e.layer,
                "op": e.op,
                "name": e.name,
                "flag": e.flag,
                "kl": float(e.kl),
                "R": _finite_or_none(e.R),
                "energy": float(e.energy),
                "skew": float(e.skew),
                "clipped": float(e.clipped),
                "rel_err": _finite_or_none(e.rel_err),
                "fisher": _finite_or_none(e.fisher),
                "ppl_delta": _finite_or_none(e.ppl_delta),
                "restore_gain": _finite_or_none(e.restore_gain),
            }
            for e in report.layers
        ],
    }


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sensitive_layers(report, path: str | Path, *, histograms: bool = True) -> Path:
    """Write the JSON (and the histogram sidecar beside it), each atomically. Returns the JSON path."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    hist_file = None
    if histograms:
        hp = hist_path_for(path)
        tensors = {}
        for e in report.layers:
            tensors[f"{e.name}.hist"] = e.hist.float().contiguous()
            tensors[f"{e.name}.range"] = torch.tensor([e.lo, e.hi], dtype=torch.float32)
        # One metadata key: safetensors writes a map of several in a random order, which made the bytes of
        # two identical scans differ.
        meta = {"quantkit": json.dumps({"format": FORMAT, "version": VERSION, "bins": report.bins}, sort_keys=True)}
        _atomic_write(hp, lambda t: save_file(tensors, str(t), metadata=meta))
        hist_file = hp.name
    d = report_to_dict(report, hist_file)
    text = json.dumps(d, indent=2) + "\n"
    _atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))
    return path


def _check_layer(i: int, e: Any, where: str) -> None:
    if not isinstance(e, dict):
        raise SensitiveLayersError(f"{where}: layers[{i}] is not an object; re-run `quantkit scan`")
    for key, typ in _LAYER_KEYS.items():
        v = e.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else isinstance(v, typ)
        if typ is int and isinstance(v, bool):
            ok = False
        if not ok:
            raise SensitiveLayersError(
                f"{where}: layers[{i}] has no valid {short_repr(key)} (expected {typ.__name__}); re-run `quantkit scan`"
            )
    if e["flag"] not in _FLAGS_RE:
        raise SensitiveLayersError(
            f"{where}: layers[{i}] ({e['name']}) has flag {short_repr(e['flag'])}; expected one of {', '.join(_FLAGS_RE)}"
        )
    r = e.get("R")
    if r is not None and (not isinstance(r, (int, float)) or isinstance(r, bool)):
        raise SensitiveLayersError(f"{where}: layers[{i}] ({e['name']}) has a non-numeric 'R'; re-run `quantkit scan`")


def load_sensitive_layers(path: str | Path, model=None) -> SensitiveLayers:
    """Read and validate sensitive_layers.json. With `model`, every named layer must be a linear of it.

    Raises SensitiveLayersError (a UsageError, one line) for a missing file,
    malformed JSON, another format or version, a malformed entry, or (with model)
    the first layer name that is not an nn.Linear of the model.
    """
    path = Path(path)
    if not path.is_file():
        raise SensitiveLayersError(f"{path} not found; create it with `quantkit scan --out {path}`")
    data = load_small_json(path, SensitiveLayersError, "re-run `quantkit scan`")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SensitiveLayersError(f"{path} is not a sensitive_layers file (format {short_repr(FORMAT)}); re-run `quantkit scan`")
    v = data.get("version")
    if v not in READABLE_VERSIONS:
        raise SensitiveLayersError(
            f"{path} has version {short_repr(v)}; this quantkit reads versions {', '.join(map(str, READABLE_VERSIONS))}: "
            "re-run `quantkit scan` with this quantkit"
        )
    for key in ("scheme", "thresholds", "layers"):
        if key not in data:
            raise SensitiveLayersError(f"{path} has no {short_repr(key)}; re-run `quantkit scan`")
    if not isinstance(data["layers"], list) or not data["layers"]:
        raise SensitiveLayersError(f"{path} lists no layers; re-run `quantkit scan`")
    try:
        from quantkit.recipe import Scheme

        Scheme.from_dict(data["scheme"])
    except (KeyError, TypeError, ValueError) as e:
        raise SensitiveLayersError(f"{path} has an invalid scheme ({e}); re-run `quantkit scan`") from e
    seen = set()
    for i, e in enumerate(data["layers"]):
        _check_layer(i, e, str(path))
        if e["name"] in seen:
            raise SensitiveLayersError(f"{path}: {e['name']} is listed twice; re-run `quantkit scan`")
        seen.add(e["name"])
    if model is not None:
        from torch import nn

        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        for e in data["layers"]:
            if e["name"] not in linears:
                raise SensitiveLayersError(
                    f"{path} names {e['name']}, which is not a linear layer of this model; "
                    "re-run `quantkit scan` on this model"
                )
    return SensitiveLayers(path, data)


def load_histograms(sl: SensitiveLayers) -> dict[str, tuple[Any, tuple[float, float]]]:
    """name -> (counts (bins,) float32, (lo, hi)) from the histogram sidecar."""
    from safetensors.torch import load_file

    hp = sl.histogram_path
    if hp is None or not hp.is_file():
        raise SensitiveLayersError(f"histogram sidecar {hp} not found; keep it beside {sl.path.name} or re-run the scan")
    t = load_file(str(hp))
    return {e["name"]: (t[f"{e['name']}.hist"], tuple(t[f"{e['name']}.range"].tolist())) for e in sl.layers}

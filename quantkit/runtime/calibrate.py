"""Calibration histograms for the fallback monitor, and the layers it watches by default.

The scan writes the float-output histograms of every linear (`sensitive_layers.hist.safetensors`);
a checkpoint does not carry them, so `monitor_histograms` measures them with the runtime itself:
every layer forced to FP16 activations (the closest to the float model a quantized checkpoint
offers), a few calibration windows, the scan's range rule (the first window's min/max plus 25% of
the span on each side) and its bin count (512). Loading the scan's file instead: `load_histograms`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantkit.runtime.monitor import MonitorError

BINS = 512
RANGE_MARGIN = 0.25  # as quantkit.sensitivity.scan.RANGE_MARGIN


def default_monitor_layers(rt, count: int = 4) -> list[str]:
    """`count` down_proj linears spread evenly over 35% to 50% of the depth.

    Measured on the default model (benchmarks/fallback.py: per-64-token-window KL on held-out pydoc vs Python
    source, SmoothQuant W8A8): the middle-depth down_proj outputs separate the two texts best (layers 12 and
    15: 2% of in-domain windows over KL 0.02, 58-60% of code windows); early blocks barely move on code, and
    the later ones (17, 20, 24) exceed 0.02 on in-domain text too (they caused every in-domain switch of
    the first run, with layers 12/14/17/20 watched). A block whose MLP is a mixture of experts has no
    down_proj every token passes through (the monitor does not watch experts): its o_proj is watched."""
    from quantkit.models.adapter import ModelAdapter

    ad = ModelAdapter.for_model(rt.hf)
    lay = ad.spec.layout
    n = len(rt.blocks)
    lo, hi = 0.35 * (n - 1), 0.5 * (n - 1)
    idx = sorted({round(lo + i * (hi - lo) / max(1, count - 1)) for i in range(count)})
    names = [next((x for x in (f"{ad.block_name(i)}.{lay.down}", f"{ad.block_name(i)}.{lay.o}") if x in rt.linears),
                  None) for i in idx]
    return [x for x in names if x is not None]


class _Recorder:
    """Stands in for the monitor during calibration: records ranges, then histograms."""

    def __init__(self, n: int, bins: int, device):
        self.lo = [float("inf")] * n
        self.hi = [float("-inf")] * n
        self.ranges: list[tuple[float, float]] | None = None
        self.counts = torch.zeros(n, bins, dtype=torch.float64, device=device)
        self.moments = torch.zeros(n, 4, dtype=torch.float64, device=device)
        self.bins = bins
        self.row_sample = self.row_weight = None
        self.enabled = True
        self.switches: list = []

    def observe(self, i: int, y: torch.Tensor) -> None:
        keep = self.row_weight.bool()
        y = y[keep].float()
        if self.ranges is None:
            self.lo[i] = min(self.lo[i], float(y.min()))
            self.hi[i] = max(self.hi[i], float(y.max()))
            return
        lo, hi = self.ranges[i]
        b = ((y - lo) * (self.bins / (hi - lo))).floor().clamp(0, self.bins - 1).long()
        self.counts[i] += torch.bincount(b.reshape(-1), minlength=self.bins).double()
        yd = y.double()
        self.moments[i] += torch.stack([torch.tensor(float(yd.numel()), dtype=torch.float64, device=yd.device),
                                        yd.sum(), (yd * yd).sum(), (yd ** 3).sum()])

    def skewness(self, i: int) -> float:
        n, s1, s2, s3 = self.moments[i].tolist()
        if n == 0:
            return 0.0
        mu = s1 / n
        var = s2 / n - mu * mu
        return (s3 / n - 3 * mu * s2 / n + 2 * mu ** 3) / var ** 1.5 if var > 0 else 0.0

    def check(self, samples, last):
        return []

    def reset_requests(self):
        pass


@torch.no_grad()
def monitor_histograms(rt, windows: torch.Tensor, layers: list[str], *, bins: int = BINS,
                       batch_size: int = 4) -> dict[str, tuple]:
    """name -> (counts (bins,), (lo, hi), skewness) of each layer's outputs over calibration windows (n, seqlen)."""
    units = {id(u): u for u in rt.linears.values()}.values()
    saved = {id(u): u.force_fp16 for u in units}
    index_saved, mon_saved = rt._mon_index, rt.monitor
    try:
        for u in units:
            u.force_fp16 = True
        rt.ensure(min(batch_size, windows.shape[0]), windows.shape[1])
        rt.enable_monitor({n: (torch.ones(bins), (0.0, 1.0)) for n in layers}, layers)
        rec = _Recorder(len(layers), bins, rt.device)
        rt.monitor = rec
        first = windows[:batch_size]
        rt.prefill([r.tolist() for r in first], chunk=first.shape[1])
        rec.ranges = []
        for lo, hi in zip(rec.lo, rec.hi):
            span = hi - lo if hi > lo else 1.0
            rec.ranges.append((lo - RANGE_MARGIN * span, hi + RANGE_MARGIN * span))
        for b0 in range(0, windows.shape[0], batch_size):
            w = windows[b0:b0 + batch_size]
            rt.prefill([r.tolist() for r in w], chunk=w.shape[1])
    finally:
        for u in units:
            u.force_fp16 = saved[id(u)]
        rt.monitor, rt._mon_index = mon_saved, index_saved
        rt.drop_graphs()
    return {n: (rec.counts[i].float().cpu(), rec.ranges[i], rec.skewness(i)) for i, n in enumerate(layers)}


def load_histograms(path: str | Path) -> dict[str, tuple]:
    """The scan's histogram sidecar (`<stem>.hist.safetensors`, or the sensitive_layers.json beside it):
    name -> (counts, (lo, hi), skewness); the skewness from the scan's JSON when it is beside the file."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix == ".json":
        p = p.with_name(p.stem + ".hist.safetensors")
    if not p.is_file():
        raise MonitorError(f"histogram file {p} not found; pass the .hist.safetensors that `quantkit scan` wrote")
    try:
        t = load_file(str(p))
    except Exception as e:
        raise MonitorError(f"{p} is not a valid safetensors file ({e}); re-run `quantkit scan`") from e
    out = {}
    for key, v in t.items():
        if key.endswith(".hist"):
            name = key[: -len(".hist")]
            r = t.get(f"{name}.range")
            if r is None or r.numel() != 2 or not float(r[1]) > float(r[0]):
                raise MonitorError(f"{p}: {name} has no valid range; re-run `quantkit scan`")
            out[name] = (v.float(), (float(r[0]), float(r[1])))
    if not out:
        raise MonitorError(f"{p} holds no histograms; re-run `quantkit scan`")
    js = p.with_name(p.name[: -len(".hist.safetensors")] + ".json") if p.name.endswith(".hist.safetensors") else None
    if js is not None and js.is_file():
        import json

        from quantkit.files import read_small_text

        try:
            skews = {e["name"]: float(e["skew"]) for e in json.loads(read_small_text(js)).get("layers", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            skews = {}
        out = {n: (*v, skews.get(n)) for n, v in out.items()}
    return out


def has_fallback_target(rt) -> bool:
    """Whether switching to FP16 changes anything: quantized activations, or FP16 copies to switch to."""
    return any(u.switchable for u in rt.linears.values())


def attach_fallback(rt, *, layers: list[str] | None = None, hist: str | Path | None = None,
                    kl_threshold: float = 0.02, skew_threshold: float = 3.0, calib_windows: int = 8,
                    calib_seqlen: int = 256, count: int = 4):
    """Turn the online fallback monitor on (see runtime.monitor); returns it, or None when the model
    has nothing to fall back to (weight-only linears without FP16 copies already run FP16 activations).

    layers: the monitored linears (default: `default_monitor_layers`); hist: the scan's histogram
    file (default: a calibration pass of `calib_windows` x `calib_seqlen` built-in calibration tokens)."""
    if kl_threshold <= 0 or skew_threshold <= 0:
        raise MonitorError("--kl-threshold and --skew-threshold must be > 0")
    if not has_fallback_target(rt):
        return None
    layers = list(layers) if layers else default_monitor_layers(rt, count)
    unknown = [n for n in layers if n not in rt.linears]
    if unknown:
        raise MonitorError(f"cannot monitor {unknown[0]}: not a quantized linear of this model "
                           f"(e.g. {next(iter(rt.linears))})")
    if hist is not None:
        hists = load_histograms(hist)
    else:
        if rt.tokenizer is None:
            raise MonitorError("no tokenizer to calibrate the monitor with; pass --hist")
        from quantkit.calib.data import calibration_set

        ids = calibration_set(rt.tokenizer, None, samples=calib_windows, seqlen=calib_seqlen, seed=0).input_ids
        hists = monitor_histograms(rt, ids, layers)
    return rt.enable_monitor(hists, layers, kl_threshold=kl_threshold, skew_threshold=skew_threshold)

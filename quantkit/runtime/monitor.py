"""Online fallback monitor: move a request to FP16 when its activations drift from calibration.

For each monitored linear, the output values of every token of a request are binned into a
512-bin histogram over the calibration range [lo, hi] of that linear (the scan's sidecar
`sensitive_layers.hist.safetensors`, or a short calibration pass through the runtime itself;
values outside go to the edge bins, as in the scan), together with power sums for the skewness.
Every 64 tokens of a request (its token positions 0-63, 64-127, ...) the window's histogram P is
compared with the calibration histogram Q:

    KL(P || Q) = sum_i p_i log(p_i / q_i)   (both smoothed by +1e-6 per bin, as the scan does)
    skew drift = |skew(window) - skew(calibration)|, skew = Pearson's third standardized moment

KL > kl_threshold (default 0.02) or a skew drift > skew_threshold (default 3) on any monitored linear
flips that request's sample bit to FP16 for the rest of the request (`PrecisionState`); every
switch is logged (request, token index, layer, statistic, value). The skew criterion is measured
from the calibration skewness, not from 0, and only on linears whose calibration skewness is itself
within the threshold: several linears of the default model have a skewness of 8 to 100 on the
calibration text, and on those a window's skewness swings with a few outlier tokens (layer 10's
down_proj: from -0.06 to -75 across in-domain windows, measured with benchmarks/fallback.py), so
|skew| > 3, or a drift of 3 from the calibration value, would move every request to FP16. The accumulation is a few
device ops per monitored linear inside the forward (captured by CUDA graphs); the check runs
between steps, once per completed window, and reads back one small tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantkit.errors import UsageError
from quantkit.kernels.mixed import TOKEN_GROUP

KL_EPS = 1e-6  # as quantkit.sensitivity.metrics.smooth


class MonitorError(UsageError):
    """The monitor cannot run as asked (no calibration histograms, unknown layer)."""


@dataclass
class Switch:
    """One fallback decision."""

    request: int  # sample index in the batch (the caller maps it to its request id)
    token: int  # the last token position of the window that fired
    layer: str
    statistic: str  # "kl" or "skew"
    value: float

    def to_dict(self) -> dict:
        return {"request": self.request, "token": self.token, "layer": self.layer, "statistic": self.statistic,
                "value": self.value}


def histogram_skewness(counts: torch.Tensor, lo: float, hi: float) -> float:
    """Skewness of the values a histogram counts (each at its bin's centre)."""
    c = counts.double().reshape(-1)
    n = float(c.sum())
    if n <= 0:
        return 0.0
    w = (hi - lo) / c.numel()
    x = lo + (torch.arange(c.numel(), dtype=torch.float64) + 0.5) * w
    mu = float((c * x).sum()) / n
    var = float((c * (x - mu) ** 2).sum()) / n
    return float((c * (x - mu) ** 3).sum()) / n / var ** 1.5 if var > 0 else 0.0


class FallbackMonitor:
    def __init__(self, hists: dict[str, tuple[torch.Tensor, tuple[float, float]]], layers: list[str], batch: int,
                 device, *, kl_threshold: float = 0.02, skew_threshold: float = 3.0, bins: int | None = None):
        """hists: linear name -> (calibration counts (bins,), (lo, hi)[, calibration skewness]); layers: the
        monitored names. Without a calibration skewness it is estimated from the histogram's bin centres."""
        missing = [n for n in layers if n not in hists]
        if missing:
            raise MonitorError(f"no calibration histogram for monitored layer {missing[0]}; "
                               "monitor layers the scan measured, or let the runtime calibrate them")
        if not layers:
            raise MonitorError("the fallback monitor needs at least one layer to watch")
        self.layers = list(layers)
        self.batch = batch
        self.kl_threshold, self.skew_threshold = float(kl_threshold), float(skew_threshold)
        nb = {int(hists[n][0].numel()) for n in layers}
        if len(nb) != 1:
            raise MonitorError(f"monitored layers have histograms of different sizes {sorted(nb)}")
        self.bins = bins or nb.pop()
        q = torch.stack([hists[n][0].double().reshape(-1) for n in layers])  # (n, bins)
        q = q / q.sum(-1, keepdim=True).clamp_min(1)
        q = q + KL_EPS
        self.log_q = (q / q.sum(-1, keepdim=True)).log().to(device)  # (n, bins)
        self.skew_ref = [float(hists[n][2]) if len(hists[n]) > 2 and hists[n][2] is not None
                         else histogram_skewness(hists[n][0], *hists[n][1]) for n in layers]
        # Skewness is a drift signal only where the calibration distribution is not itself heavy-tailed: on
        # a linear whose calibration skewness exceeds the threshold, a window's skewness follows its few
        # outlier tokens (the default model's layer-10 down_proj: -0.06 to -75 on in-domain windows).
        self.skew_active = [abs(r) <= self.skew_threshold for r in self.skew_ref]
        self._lo = [float(hists[n][1][0]) for n in layers]
        self._inv_w = [self.bins / (float(hists[n][1][1]) - float(hists[n][1][0])) for n in layers]
        n = len(layers)
        self.counts = torch.zeros(n, batch * self.bins, dtype=torch.float32, device=device)
        self.moments = torch.zeros(n, batch, 4, dtype=torch.float32, device=device)  # count, s1, s2, s3
        self.switches: list[Switch] = []
        self.fired = torch.zeros(batch, dtype=torch.bool)  # host
        self.checks = 0
        self.row_sample: torch.Tensor | None = None  # (rows,) long, set per forward by the model
        self.row_weight: torch.Tensor | None = None  # (rows,) float 0/1: token counted (not padding, not FP16)
        self.enabled = True

    def resize(self, batch: int) -> None:
        """Windows for a new batch size (the log and the thresholds stay)."""
        n = len(self.layers)
        dev = self.counts.device
        self.batch = batch
        self.counts = torch.zeros(n, batch * self.bins, dtype=torch.float32, device=dev)
        self.moments = torch.zeros(n, batch, 4, dtype=torch.float32, device=dev)
        self.fired = torch.zeros(batch, dtype=torch.bool)

    # ------------------------------------------------------------------ accumulation (inside the forward)

    def observe(self, i: int, y: torch.Tensor) -> None:
        """Add the outputs y (rows, N) of monitored layer i to each row's sample window (one launch on
        CUDA: `kernels.histogram.row_histogram`)."""
        if not self.enabled or self.row_sample is None:
            return
        from quantkit.kernels.histogram import row_histogram

        row_histogram(y, self.row_sample, self.row_weight, self._lo[i], self._inv_w[i], self.bins, self.counts[i],
                      self.moments[i])

    # ------------------------------------------------------------------ the check (between steps)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL (n_layers, batch), skew (n_layers, batch)) of the current windows (NaN where empty)."""
        c = self.counts.view(len(self.layers), self.batch, self.bins).double()
        tot = c.sum(-1, keepdim=True)
        p = c / tot.clamp_min(1) + KL_EPS
        p = p / p.sum(-1, keepdim=True)
        kl = (p * (p.log() - self.log_q.unsqueeze(1))).sum(-1)
        m = self.moments.double()
        n = m[..., 0].clamp_min(1)
        mu = m[..., 1] / n
        var = (m[..., 2] / n - mu * mu).clamp_min(0)
        m3 = m[..., 3] / n - 3 * mu * m[..., 2] / n + 2 * mu ** 3
        skew = torch.where(var > 0, m3 / var.clamp_min(1e-30) ** 1.5, torch.zeros_like(var))
        empty = (tot[..., 0] == 0)
        return kl.masked_fill(empty, math.nan), skew.masked_fill(empty, math.nan)

    def check(self, samples: list[int], last_token: dict[int, int]) -> list[int]:
        """Evaluate the windows of `samples` (each just completed 64 tokens), reset them, and return the
        samples that fire (not yet fired before). last_token: sample -> its window's last position."""
        if not samples:
            return []
        self.checks += 1
        kl, skew = self.statistics()
        kl, skew = kl.cpu(), skew.cpu()
        fired = []
        for s in samples:
            if self.fired[s]:
                continue
            for i, name in enumerate(self.layers):
                k, sk = float(kl[i, s]), float(skew[i, s])
                stat = None
                if k == k and k > self.kl_threshold:
                    stat, val = "kl", k
                elif sk == sk and self.skew_active[i] and abs(sk - self.skew_ref[i]) > self.skew_threshold:
                    stat, val = "skew", sk
                if stat is not None:
                    self.switches.append(Switch(s, int(last_token.get(s, -1)), name, stat, val))
                    self.fired[s] = True
                    fired.append(s)
                    break
        self.reset_windows(samples)
        return fired

    def reset_windows(self, samples: list[int] | None = None) -> None:
        if samples is None:
            self.counts.zero_()
            self.moments.zero_()
            return
        c = self.counts.view(len(self.layers), self.batch, self.bins)
        idx = torch.tensor(samples, dtype=torch.long, device=c.device)
        c[:, idx] = 0
        self.moments[:, idx] = 0

    def reset_requests(self) -> None:
        """A new batch: windows cleared, nobody fired (the log is kept)."""
        self.reset_windows()
        self.fired.zero_()

    @staticmethod
    def window_ends(start: int, length: int) -> list[int]:
        """Positions p in [start, start + length) that end a 64-token window (p % 64 == 63)."""
        first = start + (-(start + 1)) % TOKEN_GROUP
        return list(range(first, start + length, TOKEN_GROUP))

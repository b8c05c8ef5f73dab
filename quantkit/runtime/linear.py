"""`QuantLinear`: one linear of a quantized checkpoint, holding its weight packed for the kernels.

A QuantLinear keeps no dense copy of a quantized weight. What it holds, by `kind`:

* ``wna16``  - W4/W8 weight-only (grouped or per-channel, sym or asym): `WNA16Weight` (kernels.wna16);
* ``w8a8``   - symmetric int weights with quantized activations (W8A8, W4A4: 4-bit values in int8):
               `W8A8Weight` (kernels.w8a8); activations per token (dynamic) or per tensor (static scale);
* ``ref``    - what no kernel takes (2/3-bit, odd group sizes, asymmetric W8A8): the canonical int8
               integers + scales, dequantized per call;
* ``dense``  - a float weight only (the runtime's own BF16 path, or a linear the checkpoint keeps in float).

A sensitive linear of a mixed checkpoint also holds its FP16 weight (`w_fp16`) and starts pinned to
FP16 (`force_fp16`); releasing it runs its quantized shadow. Per call the precision is:

* ``force_fp16`` (a host flag: pinned, or forced through `runtime.precision`): FP16 on `w_fp16`, or
  FP16 activations on the dequantized integer weight (W8A16 through the mixed kernel);
* else, when the step has FP16 rows (`ctl.row_bits`, from the per-sample / per-64-token bits): the
  mixed kernel for W8A8 (one launch; two where W8A8's config is the Hopper Gluon kernel; INT8 rows
  bit-identical to the plain path), two GEMMs and a row select otherwise;
* else the quantized kernel.

On CUDA the Triton kernels run; on CPU their torch references (the kernels' dispatch rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels._common import use_triton
from quantkit.quant.core import QuantizedTensor

KINDS = ("wna16", "w8a8", "ref", "dense")


@dataclass
class StepControl:
    """Per-forward precision control shared by every QuantLinear of a model.

    row_bits: (rows,) uint8 for the rows (tokens) of the current forward, bit 0 = FP16; None when
    every row is quantized (the fast path)."""

    row_bits: torch.Tensor | None = None


def _dequantize(q, scale, zero, dtype):
    """Canonical int8 (N, K) + (N, G) scale/zero -> dense (N, K) in dtype (per call, never kept)."""
    N, K = q.shape
    g = K // scale.shape[1]
    w = q.float()
    if zero is not None:
        w = w - zero.float().repeat_interleave(g, dim=1)
    return (w * scale.float().repeat_interleave(g, dim=1)).to(dtype)


class QuantLinear(nn.Module):
    """See the module docstring. Build with `QuantLinear.from_quantized` / `from_dense`."""

    def __init__(self, name: str, in_features: int, out_features: int, kind: str, *, bias=None, packed=None,
                 canonical=None, act=None, act_scale=None, w_fp16=None, args=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown QuantLinear kind {kind!r}")
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.kind = kind
        self.packed = packed  # WNA16Weight | W8A8Weight | None
        self.canonical = canonical  # (q, scale, zero) for kind "ref"
        self.act = act  # ActQuantArgs | None
        self.act_scale = act_scale  # (1,) fp32 static per-tensor input scale | None
        self.w_fp16 = w_fp16  # (N, K) float weight | None
        self.bias = bias
        self.args = args  # QuantArgs of the quantized weight | None
        self.pinned = w_fp16 is not None and kind != "dense"  # sensitive: FP16 until released
        self.force_fp16 = self.pinned or kind == "dense"
        self.ctl: StepControl | None = None
        self._cpu_integers = None  # see _integers
        self.parts: list[tuple[str, int]] = [(name, out_features)]  # fused: (member name, out_features)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_quantized(cls, name: str, qt: QuantizedTensor, *, bias=None, act=None, act_scale=None, w_fp16=None,
                       device="cpu", dtype=torch.float16) -> "QuantLinear":
        """Pack a canonical quantized tensor for the kernels that take it (on `device`)."""
        from quantkit.kernels import wna16 as kw
        from quantkit.kernels.w8a8 import prepack_w8a8

        N, K = qt.q.shape
        q = qt.q.to(device)
        scale = qt.scale.to(device, torch.float32)
        zero = None if qt.zero is None else qt.zero.to(device)
        if zero is not None and not bool(zero.any()):
            zero = None
        gs = K // scale.shape[1]
        bias = None if bias is None else bias.to(device, dtype)
        w16 = None if w_fp16 is None else w_fp16.to(device, dtype).contiguous()
        common = dict(bias=bias, act=act, w_fp16=w16, args=qt.args)
        if act is not None:
            if zero is None and scale.shape[1] == 1:
                return cls(name, K, N, "w8a8", packed=prepack_w8a8(q, scale), act_scale=None if act_scale is None
                           else act_scale.reshape(1).to(device, torch.float32), **common)
            return cls(name, K, N, "ref", canonical=(q, scale, zero), act_scale=None if act_scale is None
                       else act_scale.reshape(1).to(device, torch.float32), **common)
        if qt.args.bits in (4, 8) and kw.check_group_size(gs, K):
            sdt = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
            return cls(name, K, N, "wna16", packed=kw.prepack_wna16(q, scale, zero, qt.args.bits, scale_dtype=sdt),
                       **common)
        return cls(name, K, N, "ref", canonical=(q, scale, zero), **common)

    @classmethod
    def from_dense(cls, name: str, weight: torch.Tensor, bias=None) -> "QuantLinear":
        """A float linear (the runtime's BF16 path, or a linear kept in float)."""
        N, K = weight.shape
        return cls(name, K, N, "dense", bias=bias, w_fp16=weight)

    # ------------------------------------------------------------------ paths

    @property
    def switchable(self) -> bool:
        """Whether per-row FP16 bits change this layer's output (quantized activations, or an FP16 copy)."""
        return self.kind != "dense" and (self.act is not None or self.w_fp16 is not None)

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        from quantkit.kernels import act_quant, w8a8, wna16

        if self.kind == "wna16":
            if not x.is_cuda and not use_triton(x):  # the reference's math, without unpacking every call
                return F.linear(x, _dequantize(*self._integers(), x.dtype), self.bias)
            return wna16.wna16_linear(x, self.packed, self.bias)
        if self.kind == "w8a8":
            a = self.act
            if self.act_scale is None and a.strategy == "token" and a.bits == 8:
                return w8a8.w8a8_linear(x, self.packed, self.bias)
            if self.act_scale is not None:
                a_q, a_s = act_quant.static_quant(x, self.act_scale, a.qmax)
            elif a.strategy == "token":
                a_q, a_s = act_quant.per_token_quant(x, qmax=a.qmax)
            else:  # dynamic per-tensor
                s = x.detach().float().abs().amax().clamp_min(act_quant.EPS).reshape(1) / a.qmax
                a_q, a_s = act_quant.static_quant(x, s, a.qmax)
            return w8a8.w8a8_gemm_q(a_q, a_s, self.packed, self.bias, out_dtype=x.dtype)
        if self.kind == "ref":
            if self.act is not None:
                from quantkit.quant.core import fake_quantize_activations

                x = fake_quantize_activations(x, self.act, self.act_scale)
            return F.linear(x, _dequantize(*self.canonical, x.dtype), self.bias)
        return F.linear(x, self.w_fp16, self.bias)

    def _integers(self):
        """(q int8 (N, K), scale (N, G) fp32, zero (N, G) int8 | None) of a packed W4/W8A16 weight, unpacked
        once. Only the CPU path keeps them (int8, not a dense float copy): the kernels' torch reference would
        unpack the words on every call, ~10 ms per linear of the default model."""
        if self._cpu_integers is None:
            from quantkit.kernels.wna16 import _unpack_ref

            w = self.packed
            self._cpu_integers = _unpack_ref(w.qw, w.scales, w.zeros, w.bits, w.group_size, w.N, w.K)
        return self._cpu_integers

    def _fp16(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_fp16 is not None:
            return F.linear(x, self.w_fp16, self.bias)
        if self.kind == "w8a8":  # FP16 activations on the dequantized integer weight, one launch
            from quantkit.kernels.mixed import CTRL_FORCE_FP16, mixed_linear

            return mixed_linear(x, self.packed, None, CTRL_FORCE_FP16, None, self.bias)
        if self.kind == "ref":
            return F.linear(x, _dequantize(*self.canonical, x.dtype), self.bias)
        return self._quantized(x)  # weight-only: activations are FP16 already

    def _mixed(self, x: torch.Tensor, row_bits: torch.Tensor) -> torch.Tensor:
        if self.kind == "w8a8" and self.act_scale is None and self.act.strategy == "token" and self.act.bits == 8:
            from quantkit.kernels.mixed import CTRL_ROW_BITS, mixed_linear

            return mixed_linear(x, self.packed, self.w_fp16, CTRL_ROW_BITS, row_bits, self.bias)
        y_q = self._quantized(x)
        y_f = self._fp16(x)
        return torch.where((row_bits & 1).bool().unsqueeze(-1), y_f, y_q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) fp16/bf16 (fp32 on CPU) -> (..., out_features)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rb = None if self.ctl is None else self.ctl.row_bits
        if self.force_fp16:
            y = self._fp16(x2)
        elif rb is not None and self.switchable and rb.shape[0] == x2.shape[0]:
            y = self._mixed(x2, rb)
        else:
            y = self._quantized(x2)
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ bookkeeping

    def weight_bytes(self) -> int:
        """Bytes this linear keeps on its device (packed weight, scales, FP16 copy, bias)."""
        ts = []
        if self.packed is not None:
            ts += [t for t in vars(self.packed).values() if isinstance(t, torch.Tensor)]
        if self.canonical is not None:
            ts += [t for t in self.canonical if t is not None]
        ts += [t for t in (self.w_fp16, self.bias, self.act_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def extra_repr(self) -> str:
        what = self.kind if self.args is None else f"{self.kind} {self.args.describe()}"
        if self.act is not None:
            what += f", {self.act.describe()}"
        if self.pinned:
            what += ", FP16 copy (pinned)" if self.force_fp16 else ", FP16 copy (released)"
        return f"{self.in_features} -> {self.out_features}, {what}"


def can_fuse(mods: list[QuantLinear]) -> bool:
    """Whether linears that read the same input can run as one (their outputs concatenated)."""
    a = mods[0]
    if len({m.in_features for m in mods}) != 1 or len({m.kind for m in mods}) != 1:
        return False
    if len({m.args for m in mods}) != 1 or len({m.act for m in mods}) != 1:
        return False
    if len({m.pinned for m in mods}) != 1 or len({m.force_fp16 for m in mods}) != 1:
        return False
    if len({m.w_fp16 is None for m in mods}) != 1 or len({m.bias is None for m in mods}) != 1:
        return False
    if a.act_scale is not None and not all(torch.equal(m.act_scale, a.act_scale) for m in mods):
        return False
    if a.kind == "wna16":
        p = [m.packed for m in mods]
        if len({(w.bits, w.group_size, w.zeros is None, w.scales.dtype) for w in p}) != 1:
            return False
    return True


def fuse(mods: list[QuantLinear], name: str) -> QuantLinear:
    """One QuantLinear computing the concatenated outputs of `mods` (see `can_fuse`); `parts` says
    which output columns belong to which member (so a caller can split, and precision control and
    the monitor still speak of the members' names)."""
    from quantkit.kernels.w8a8 import W8A8Weight
    from quantkit.kernels.wna16 import WNA16Weight

    a = mods[0]
    N = sum(m.out_features for m in mods)
    cat = (lambda ts, d: None if ts[0] is None else torch.cat(ts, dim=d))
    packed = canonical = None
    if a.kind == "wna16":
        p = [m.packed for m in mods]
        packed = WNA16Weight(qw=torch.cat([w.qw for w in p], 1), scales=torch.cat([w.scales for w in p], 1),
                             zeros=cat([w.zeros for w in p], 1), bits=p[0].bits, group_size=p[0].group_size, N=N, K=p[0].K)
    elif a.kind == "w8a8":
        packed = W8A8Weight(w=torch.cat([m.packed.w for m in mods], 0), scale=torch.cat([m.packed.scale for m in mods], 0))
    elif a.kind == "ref":
        canonical = tuple(cat([m.canonical[i] for m in mods], 0) for i in range(3))
    out = QuantLinear(name, a.in_features, N, a.kind, bias=cat([m.bias for m in mods], 0), packed=packed,
                      canonical=canonical, act=a.act, act_scale=a.act_scale, w_fp16=cat([m.w_fp16 for m in mods], 0),
                      args=a.args)
    out.pinned, out.force_fp16 = a.pinned, a.force_fp16
    out.parts = [p for m in mods for p in m.parts]
    return out

"""The runtime's preallocated K/V cache: the model's float dtype, or INT8 (W8A8C8; KV4 stores its
4-bit values in int8) with static per-channel or dynamic per-token scales and, optionally, 4-bit
residuals for outlier tokens.

Layout, per layer l (all allocated once, at the largest batch and length the run needs):

    k[l], v[l]            (B, Hkv, T, D)  int8 or float, K after RoPE (and SpinQuant's R3)
    k_scale[l], v_scale[l] (B, Hkv, T) fp32 per-token scales  |  (Hkv, D) per-channel static scales
    residuals             per K and V: idx (B, Hkv, T) int16 (slot or -1), pool (B, Hkv, C + 1, D // 2)
                          int8 (two 4-bit values a byte; slot C is a sink for writes that found no free
                          slot), scale (B, Hkv, C + 1) fp32, next free slot (B, Hkv) int32

A token vector's residual is kept when its relative INT8 error exceeds tau x the calibration mean
error (`quantkit.quant.kv`, the same rule the simulation applies); C = max_len // 8 slots per
(sample, head) by default: a token that finds the pool full keeps no residual and is counted in
`overflow`. Quantization uses `quantkit.quant.kv` (one definition with the simulation and the
kernels); decode reads the cache through `kernels.attention.decode_attention` (INT8 read directly).
"""

from __future__ import annotations

import torch

from quantkit.kernels.attention import Residuals, decode_attention, dequantize_cache_ref, pack_nibbles
from quantkit.kernels.fused import rope, rope_store, split_heads
from quantkit.quant import kv as kvq
from quantkit.recipe import KVCacheArgs


class KVCache:
    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
                 device, kv: KVCacheArgs | None = None, static: list[dict] | None = None, residual: bool | None = None,
                 residual_slots: int | None = None):
        """kv: None = a float cache in `dtype`; else INT8 storage per `kv`. static: per layer
        {"k_scale": (Hkv, D), "v_scale": ..., "k_mean_eps": float, "v_mean_eps": float} (static strategies
        and residuals). residual: outlier residuals on/off (default: kv.residual_bits set)."""
        self.n_layers, self.batch, self.kv_heads, self.max_len, self.head_dim = n_layers, batch, kv_heads, max_len, head_dim
        self.dtype, self.device, self.kv = dtype, torch.device(device), kv
        shape = (n_layers, batch, kv_heads, max_len, head_dim)
        store = dtype if kv is None else torch.int8
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.k_scale = self.v_scale = None
        self.residual = False
        # device-side counts (read when reported): token vectors written, residuals kept, pool overflows
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)
        if kv is None:
            return
        if kv.strategy == "token":
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        else:
            if static is None or len(static) != n_layers:
                raise ValueError(f"a static {kv.strategy} KV cache needs calibrated scales for all {n_layers} layers")
            ks, vs = [], []
            for e in static:
                for lst, which in ((ks, "k"), (vs, "v")):
                    s = e[f"{which}_scale"].float().to(device)
                    if kv.strategy == "tensor":
                        s = s.max().expand(kv_heads, head_dim)
                    s = s.reshape(kv_heads, -1)
                    # heads narrower than the cache's (multi-head latent attention: zero-padded; any scale keeps 0)
                    lst.append(torch.nn.functional.pad(s, (0, head_dim - s.shape[1]), value=1.0))
            self.k_scale = torch.stack(ks).contiguous()
            self.v_scale = torch.stack(vs).contiguous()
        self.residual = bool(kv.residual_bits) if residual is None else bool(residual)
        if self.residual:
            if static is None or any(f"{w}_mean_eps" not in e for e in static for w in ("k", "v")):
                raise ValueError("KV residuals need the calibration mean errors (k_mean_eps / v_mean_eps) of every layer")
            self.res_bits = kv.residual_bits or 4
            self.tau = kv.residual_tau
            self.mean_eps = torch.tensor([[e["k_mean_eps"], e["v_mean_eps"]] for e in static], dtype=torch.float32,
                                         device=device)  # (L, 2)
            C = residual_slots if residual_slots is not None else max(1, max_len // 8)
            self.slots = C
            width = head_dim // 2 if self.res_bits == 4 else head_dim
            self.r_idx = torch.full((2, *shape[:-1]), -1, dtype=torch.int16, device=device)
            self.r_pool = torch.zeros((2, n_layers, batch, kv_heads, C + 1, width), dtype=torch.int8, device=device)
            self.r_scale = torch.zeros((2, n_layers, batch, kv_heads, C + 1), dtype=torch.float32, device=device)
            self.r_next = torch.zeros((2, n_layers, batch, kv_heads), dtype=torch.int32, device=device)

    # ------------------------------------------------------------------ bookkeeping

    def reset(self) -> None:
        """Forget every request (new batch): residual pools emptied (the counts keep adding up)."""
        if self.residual:
            self.r_idx.fill_(-1)
            self.r_next.zero_()

    def reset_counts(self) -> None:
        self.counts.zero_()

    def nbytes(self) -> int:
        """Bytes the cache holds on its device (K/V, scales, residual pools and indices)."""
        ts = [self.k, self.v, self.k_scale, self.v_scale]
        if self.residual:
            ts += [self.r_idx, self.r_pool, self.r_scale, self.r_next]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def stats(self) -> dict:
        tokens, patched, overflow = (int(x) for x in self.counts.tolist())
        return {"kv_tokens": tokens, "kv_patched": patched, "kv_overflow": overflow,
                "patched_fraction": patched / tokens if tokens else 0.0}

    # ------------------------------------------------------------------ write

    def _quantize(self, layer: int, which: int, x: torch.Tensor):
        """x: (B, H, S, D) float -> (q int8, per-token scale (B, H, S) or None, x_hat fp32)."""
        kv = self.kv
        if kv.strategy == "token":
            scale = kvq.kv_scale(x, "token", kv.bits)  # (B, H, S, 1)
            q = kvq.quantize_kv(x, scale, kv.bits)
            return q, scale[..., 0], q.float() * scale
        st = (self.k_scale if which == 0 else self.v_scale)[layer]
        s = st.view(1, self.kv_heads, 1, self.head_dim)
        q = kvq.quantize_kv(x, s, kv.bits)
        return q, None, q.float() * s

    def _keep_residuals(self, layer: int, which: int, x: torch.Tensor, x_hat: torch.Tensor, pos: torch.Tensor):
        """Residuals of the outlier tokens of x (B, H, S, D) written at positions pos (B, S)."""
        B, H, S, D = x.shape
        eps = kvq.relative_error(x, x_hat)  # (B, H, S)
        patched = kvq.select_outliers(eps, self.mean_eps[layer, which], self.tau)
        rq, rs = kvq.quantize_residual(x.float() - x_hat, self.res_bits)
        nxt = self.r_next[which, layer, :B]  # (B, H)
        slot = nxt.unsqueeze(-1) + patched.to(torch.int32).cumsum(-1) - 1
        ok = patched & (slot < self.slots)
        slot_w = torch.where(ok, slot, self.slots).long()  # a full pool writes into the sink slot C
        vals = pack_nibbles(rq) if self.res_bits == 4 else rq
        self.r_pool[which, layer, :B].scatter_(2, slot_w.unsqueeze(-1).expand(B, H, S, vals.shape[-1]), vals)
        self.r_scale[which, layer, :B].scatter_(2, slot_w, rs[..., 0])
        idx = torch.where(ok, slot, -1).to(torch.int16)
        self.r_idx[which, layer, :B].scatter_(2, pos.view(B, 1, S).expand(B, H, S), idx)
        nxt += ok.sum(-1, dtype=torch.int32)
        self.counts[1] += ok.sum()
        self.counts[2] += (patched & ~ok).sum()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store K and V (B, H, S, D) at positions pos (B, S) long (each sample its own positions);
        B may be smaller than the cache's batch (the first B slots are used)."""
        B, H, S, D = k.shape
        index = pos.view(B, 1, S, 1).expand(B, H, S, D)
        if self.kv is None:
            self.k[layer, :B].scatter_(2, index, k.to(self.dtype))
            self.v[layer, :B].scatter_(2, index, v.to(self.dtype))
            return
        for which, x in ((0, k), (1, v)):
            q, scale, x_hat = self._quantize(layer, which, x)
            (self.k if which == 0 else self.v)[layer, :B].scatter_(2, index, q)
            if scale is not None:
                (self.k_scale if which == 0 else self.v_scale)[layer, :B].scatter_(2, pos.view(B, 1, S).expand(B, H, S), scale)
            if self.residual:
                self._keep_residuals(layer, which, x, x_hat, pos)
        self.counts[0] += 2 * B * H * S

    def rope_write(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   n_heads: int) -> torch.Tensor:
        """RoPE on q and k of the fused q/k/v output qkv (B, S, (Hq + 2 Hkv) * D), K and V stored at pos (B, S);
        returns q (B, Hq, S, D). One launch (kernels.fused.rope_store) unless residuals are kept."""
        B, S, _ = qkv.shape
        H, D = self.kv_heads, self.head_dim
        if self.residual:
            q, k, v = (t.transpose(1, 2) for t in split_heads(qkv, n_heads, H, D))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            self.write(layer, k, v, pos)
            return q
        bits = 8 if self.kv is None else self.kv.bits
        q = rope_store(qkv, cos, sin, pos, n_heads, H, D, self.k[layer, :B], self.v[layer, :B],
                       None if self.kv is None else self._scale(0, layer, B),
                       None if self.kv is None else self._scale(1, layer, B), bits)
        if self.kv is not None:
            self.counts[0] += 2 * B * H * S
        return q

    # ------------------------------------------------------------------ read

    def _res(self, which: int, layer: int, B: int) -> Residuals | None:
        if not self.residual:
            return None
        return Residuals(self.r_idx[which, layer, :B], self.r_pool[which, layer, :B], self.r_scale[which, layer, :B],
                         self.res_bits)

    def _scale(self, which: int, layer: int, B: int):
        s = self.k_scale if which == 0 else self.v_scale
        if s is None:
            return None
        return s[layer, :B] if self.kv.strategy == "token" else s[layer]

    def read(self, layer: int, length: int, B: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [0, length) of the first B samples as float (B, H, length, D) in the cache's dtype
        (dequantized, residuals added): what prefill attention reads."""
        B = self.batch if B is None else B
        if self.kv is None:
            return self.k[layer, :B, :, :length], self.v[layer, :B, :, :length]
        kf = dequantize_cache_ref(self.k[layer, :B], self._scale(0, layer, B), length, self._res(0, layer, B))
        vf = dequantize_cache_ref(self.v[layer, :B], self._scale(1, layer, B), length, self._res(1, layer, B))
        return kf.to(self.dtype), vf.to(self.dtype)

    def decode_attention(self, layer: int, q: torch.Tensor, seq_lens: torch.Tensor, *, window: int | None,
                         sm_scale: float, softcap: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of attention: q (B, Hq, D) over each sample's first seq_lens[b] positions
        (softcap: Gemma 2's score soft-capping, 0 = off)."""
        B = q.shape[0]
        return decode_attention(q, self.k[layer, :B], self.v[layer, :B], seq_lens, k_scale=self._scale(0, layer, B),
                                v_scale=self._scale(1, layer, B), k_res=self._res(0, layer, B),
                                v_res=self._res(1, layer, B), window=window, sm_scale=sm_scale, softcap=softcap,
                                out=out)


class LatentCache:
    """Multi-head latent attention's cache (DeepSeek, `RuntimeModel(latent_cache=True)`): per layer and token
    the normed kv latent and the rotated k_pe, the one K head every query head shares,

        x[l]   (B, 1, T, kv_lora_rank + qk_rope_head_dim)  in the model's dtype

    (576 values a token and layer for DeepSeek-V3, against 128 heads x (192 + 128) for K and V per head).
    Attention reads it with kv_b's K and V halves absorbed into the query and the output
    (`RuntimeModel._latent_attend`). Float only: the INT8 KV cache quantizes K and V per head."""

    kv = None
    residual = False

    def __init__(self, n_layers: int, batch: int, max_len: int, width: int, *, dtype: torch.dtype, device):
        self.n_layers, self.batch, self.max_len, self.width = n_layers, batch, max_len, width
        self.dtype, self.device = dtype, torch.device(device)
        self.x = torch.zeros((n_layers, batch, 1, max_len, width), dtype=dtype, device=device)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)  # as KVCache's (nothing quantized here)

    def reset(self) -> None:
        pass  # positions are written before they are read: nothing to forget

    def reset_counts(self) -> None:
        self.counts.zero_()

    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def stats(self) -> dict:
        return {"kv_tokens": 0, "kv_patched": 0, "kv_overflow": 0, "patched_fraction": 0.0}

    def write(self, layer: int, x: torch.Tensor, pos: torch.Tensor) -> None:
        """Store x (B, 1, S, width) at positions pos (B, S) long (the first B samples)."""
        B, _, S, W = x.shape
        self.x[layer, :B].scatter_(2, pos.view(B, 1, S, 1).expand(B, 1, S, W), x.to(self.dtype))

    def read(self, layer: int, length: int, B: int) -> torch.Tensor:
        """Positions [0, length) of the first B samples: (B, 1, length, width)."""
        return self.x[layer, :B, :, :length]

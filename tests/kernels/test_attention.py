"""Decode attention over the cache as stored: Triton kernel vs its torch reference (interpreter on CPU)."""

import pytest
import torch

from _kernel_util import rel_err
from quantkit.kernels import attention as A
from quantkit.quant import kv as kvq


def _case(dev, B, Hq, Hkv, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).half().to(dev)
    k = (torch.randn(B, Hkv, T, D, generator=g) * (1 + 3 * torch.rand(1, 1, 1, D, generator=g))).to(dev)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dev)
    lens = torch.randint(1, T + 1, (B,), generator=g).to(torch.int32).to(dev)
    lens[0] = T
    return q, k, v, lens


def _residuals(dev, B, H, T, D, C, seed, bits=4):
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, H, T), -1, dtype=torch.int16)
    pick = torch.rand(B, H, T, generator=g) < 0.2
    slot = pick.to(torch.int32).cumsum(-1) - 1
    idx = torch.where(pick & (slot < C), slot, -1).to(torch.int16)
    lim = 7 if bits == 4 else 127
    rq = torch.randint(-lim, lim + 1, (B, H, C + 1, D), generator=g, dtype=torch.int8)
    pool = A.pack_nibbles(rq) if bits == 4 else rq
    return A.Residuals(idx.to(dev), pool.to(dev), (torch.rand(B, H, C + 1, generator=g) * 0.05).to(dev), bits)


def _cache(k, v, strategy):
    """(k, v as the cache stores them, their scale arguments): strategy "float" (fp16), "token" or "channel" (INT8)."""
    if strategy == "float":
        return k.half(), v.half(), {}
    Hkv, D = k.shape[1], k.shape[3]
    if strategy == "token":
        ks, vs = kvq.kv_scale(k, "token"), kvq.kv_scale(v, "token")
        kw = dict(k_scale=ks[..., 0].contiguous(), v_scale=vs[..., 0].contiguous())
    else:
        ks = kvq.static_scale(kvq.channel_amax(k)).view(1, Hkv, 1, D)
        vs = kvq.static_scale(kvq.channel_amax(v)).view(1, Hkv, 1, D)
        kw = dict(k_scale=ks.reshape(Hkv, D).contiguous(), v_scale=vs.reshape(Hkv, D).contiguous())
    return kvq.quantize_kv(k, ks), kvq.quantize_kv(v, vs), kw


@pytest.mark.parametrize("B,Hq,Hkv,T,D", [(2, 4, 2, 70, 32), (3, 6, 2, 130, 16), (1, 8, 8, 40, 64)])
@pytest.mark.parametrize("mode", ["float", "token", "channel", "channel-res4", "token-res8", "channel-window"])
def test_decode_attention_matches_reference(dev, B, Hq, Hkv, T, D, mode):
    q, k, v, lens = _case(dev, B, Hq, Hkv, T, D, seed=B * 100 + T + D)
    kc, vc, kw = _cache(k, v, mode.split("-")[0])
    if "res" in mode:
        bits = 4 if mode.endswith("res4") else 8
        kw.update(k_res=_residuals(dev, B, Hkv, T, D, 9, 1, bits), v_res=_residuals(dev, B, Hkv, T, D, 9, 2, bits))
    if "window" in mode:
        kw.update(window=17)
    y = A.decode_attention(q, kc, vc, lens, block_n=16, split=32, **kw)
    ref = A.decode_attention_ref(q, kc, vc, lens, **kw)
    assert y.dtype == q.dtype and torch.isfinite(y).all()
    assert rel_err(y, ref) <= 5e-3
    if "res" in mode or "window" in mode:  # the option changed the answer: dropping it fails the check
        drop = {k_: v_ for k_, v_ in kw.items() if k_ not in ("k_res", "v_res", "window")}
        assert rel_err(y, A.decode_attention_ref(q, kc, vc, lens, **drop)) > 2e-2


def test_pack_nibbles_round_trip_and_empty_splits(dev):
    r = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    assert torch.equal(A.unpack_nibbles(A.pack_nibbles(r)), r)
    # a sample of length 1 leaves most splits empty: they must not contribute
    q, k, v, lens = _case(dev, 2, 4, 2, 100, 32, seed=3)
    lens = torch.tensor([1, 100], dtype=torch.int32, device=dev)
    y = A.decode_attention(q, k.half(), v.half(), lens, block_n=16, split=16)
    assert rel_err(y, A.decode_attention_ref(q, k.half(), v.half(), lens)) <= 5e-3
    assert rel_err(y[0], v[0, :, 0].half().repeat_interleave(2, 0)) <= 5e-3  # one key: its value


@pytest.mark.parametrize("mode", ["float", "token", "channel-window"])
def test_decode_attention_softcap_matches_reference(dev, mode):
    """Gemma 2's attention logit soft-capping (SOFTCAP constexpr): scores -> tanh(s / c) * c before the
    mask and softmax, in the kernel's log2 units, against the reference; a cap that bites (scores up to
    ~3x the cap), so leaving it out fails the check. The reference against a direct fp64 computation."""
    B, Hq, Hkv, T, D = 2, 4, 2, 70, 32
    q, k, v, lens = _case(dev, B, Hq, Hkv, T, D, seed=11)
    q = q * 3
    kc, vc, kw = _cache(k, v, mode.split("-")[0])
    if mode.endswith("window"):
        kw["window"] = 17
    cap, sm = 2.0, 0.3
    y = A.decode_attention(q, kc, vc, lens, block_n=16, split=32, sm_scale=sm, softcap=cap, **kw)
    ref = A.decode_attention_ref(q, kc, vc, lens, sm_scale=sm, softcap=cap, **kw)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= 5e-3
    assert rel_err(y, A.decode_attention_ref(q, kc, vc, lens, sm_scale=sm, **kw)) > 5e-2  # the cap mattered
    if mode == "float":  # the reference is the formula
        kf, vf = kc.double().cpu().repeat_interleave(2, 1), vc.double().cpu().repeat_interleave(2, 1)
        s = torch.einsum("bhd,bhtd->bht", q.double().cpu(), kf) * sm
        s = torch.tanh(s / cap) * cap
        s = s.masked_fill(torch.arange(T).view(1, 1, T) >= lens.cpu().long().view(B, 1, 1), float("-inf"))
        want = torch.einsum("bht,bhtd->bhd", torch.softmax(s, -1), vf)
        assert rel_err(ref.cpu(), want) <= 1e-3

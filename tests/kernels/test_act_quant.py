import pytest
import torch

from _kernel_util import poison
from quantkit.kernels import act_quant


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K", [(1, 96), (5, 300), (3, 20000)])  # 20000 > one-pass limit: two-pass loop
def test_per_token_quant_matches_ref(dev, dtype, M, K):
    g = torch.Generator().manual_seed(M * 7 + K)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10 + 0.01).to(dtype).to(dev)
    q = poison((M, K), torch.int8, dev)
    s = poison((M, 1), torch.float32, dev)
    act_quant.per_token_quant_triton(x, out_q=q, out_s=s)
    qr, sr = act_quant.per_token_quant_ref(x)
    assert torch.equal(s, sr)
    assert torch.equal(q, qr)  # exact on the GPU too: IEEE scale, correctly rounded quotient
    assert q.abs().max() <= 127 and q.abs().max() == 127  # symmetric range, row max hits 127
    # dequantization error is bounded by half a step per element
    err = (q.float() * s - x.float()).abs()
    assert (err <= s * 0.5 + 1e-6).all()


def test_per_token_quant_public_op_and_fake(dev):
    x = torch.randn(2, 3, 64, dtype=torch.float16, generator=torch.Generator().manual_seed(0)).to(dev)
    q, s = act_quant.per_token_quant(x)
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 1) and q.dtype == torch.int8
    qr, sr = act_quant.per_token_quant_ref(x.reshape(6, 64))
    assert torch.equal(q.reshape(6, 64), qr)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq, fs = torch.ops.quantkit.per_token_quant(torch.empty(5, 32, dtype=torch.float16))
    assert fq.shape == (5, 32) and fs.shape == (5, 1)


@pytest.mark.parametrize("K", [64, 200])
@pytest.mark.parametrize("qmax", [127, 7])
def test_static_scale_and_a4_modes(dev, K, qmax):
    """The kernel's static per-tensor mode and its A4 range match quantize_symmetric_ref exactly."""
    g = torch.Generator().manual_seed(K + qmax)
    x = (torch.randn(9, K, generator=g) * 3).half().to(dev)
    # static: a scale calibrated on smaller data, so some values clip to +-qmax
    st = torch.tensor([float(x.float().abs().max()) / qmax / 2], device=dev)
    q, s = act_quant.per_token_quant_triton(x, qmax=qmax, static_scale=st,
                                            out_q=poison((9, K), torch.int8, dev), out_s=poison((9, 1), torch.float32, dev))
    want = act_quant.quantize_symmetric_ref(x, st.reshape(1, 1), qmax)
    assert torch.equal(q, want) and torch.equal(s, st.expand(9, 1))
    assert int(q.abs().max()) == qmax  # clipped
    qs, ss = act_quant.static_quant(x, st, qmax)
    assert torch.equal(qs, want)
    # dynamic A4: per-row max hits qmax
    q4, s4 = act_quant.per_token_quant_triton(x, qmax=qmax)
    q4r, s4r = act_quant.per_token_quant_ref(x, qmax)
    assert torch.equal(s4, s4r) and torch.equal(q4, q4r)
    assert int(q4.abs().max()) == qmax


@pytest.mark.parametrize("qmax", [127, 7])
def test_quantizer_on_exact_ties_and_their_neighbours(dev, qmax):
    """The kernel's reciprocal form (one division per row, then x * rcp with one FMA correction) gives the
    reference's integers where it matters most: x / scale exactly on a half-integer (ties away from zero) and one
    fp16 step either side of it, for power-of-two scales (exact ties) and others (near ties), both signs."""
    rows = []
    for amax in [qmax * 2.0 ** e for e in (-12, -3, 0, 4)] + [0.3711, 3.140625, 1000.0, 57344.0]:
        scale = torch.tensor(amax, dtype=torch.float16).float() / qmax
        ties = (torch.arange(qmax, dtype=torch.float32) + 0.5) * scale
        t16 = ties.half()
        up = torch.nextafter(t16, torch.full_like(t16, float("inf")))
        down = torch.nextafter(t16, torch.full_like(t16, float("-inf")))
        vals = torch.cat([t16, up, down])
        vals = vals[vals.float().abs() <= float(torch.tensor(amax, dtype=torch.float16))]
        row = torch.cat([torch.tensor([amax], dtype=torch.float16), vals, -vals])
        rows.append(torch.nn.functional.pad(row, (0, 3 * qmax * 2 + 1 - row.numel())))  # zeros pad
    x = torch.stack(rows).to(dev)
    q, s = act_quant.per_token_quant_triton(x, qmax=qmax, out_q=poison(x.shape, torch.int8, dev),
                                            out_s=poison((x.shape[0], 1), torch.float32, dev))
    qr, sr = act_quant.per_token_quant_ref(x, qmax)
    assert torch.equal(s, sr)
    assert torch.equal(q, qr)
    # the exact ties of the power-of-two rows round away from zero: +-(j + 1) for (j + 0.5) * scale
    assert int(q[0, 1]) == 1 and int(q[0, 1 + 3 * qmax]) == -1


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_static_scale_far_below_the_data_clamps_with_the_sign(dev):
    """A static scale many orders below the data: quotients overflow fp32 (no FMA correction there); every
    value clamps to +-qmax with its sign, zeros stay zero."""
    x = torch.tensor([[60000.0, -60000.0, 1.0, -1.0, 0.0, 3e-5, -3e-5, 0.5]], dtype=torch.float16).to(dev)
    st = torch.tensor([1e-38], device=dev)
    q, _ = act_quant.per_token_quant_triton(x, static_scale=st)
    assert torch.equal(q, act_quant.quantize_symmetric_ref(x, st.reshape(1, 1), 127))
    assert q.tolist() == [[127, -127, 127, -127, 0, 127, -127, 127]]


def test_reciprocal_quotient_gives_the_division_s_integers_for_every_fp16_value():
    """The arithmetic behind ``_common.quantize_sym_rcp``, outside any kernel: for every finite fp16 x with
    |x| <= 127 * scale, round_half_away(fma(fma(-s, x * r, x), r, x * r)) with r = RN(1 / s) equals
    round_half_away(RN(x / s)), for scales amax / 127 of random fp16 amax and for significands that stress a
    reciprocal (all ones, one, powers of two) over 40 binades.  (Session 37 ran the same over 3280 scales,
    102 million pairs: no difference; the uncorrected x * r differed 174 times in 15 million.)"""
    np = pytest.importorskip("numpy")
    try:
        from triton._C.libtriton import interpreter as tri
        fma = tri.fma_fp32
    except (ImportError, AttributeError):
        pytest.skip("this Triton has no fused fp32 multiply-add for the CPU")
    f32 = np.float32
    xs = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    xs = xs[np.isfinite(xs)].astype(f32)
    rng = np.random.default_rng(0)
    amax = rng.choice(np.abs(xs[xs != 0]), 200, replace=False)
    scales = list((amax / f32(127)).astype(f32))
    scales += [np.array([((127 + e) << 23) | m], dtype=np.uint32).view(f32)[0]
               for e in range(-30, 10, 3) for m in (0x7FFFFF, 0x000000, 0x000001, 0x7FFFFE, 0x555555)]

    def rnd(y):
        return np.clip(np.where(y >= 0, np.floor(y + f32(0.5)), np.ceil(y - f32(0.5))), -127, 127)

    n = 0
    for s in scales:
        s = f32(s)
        x = xs[np.abs(xs) <= s * f32(127)]
        r = f32(1) / s
        q = (x * r).astype(f32)
        q1 = fma(fma(np.full_like(x, -s), q, x), np.full_like(x, r), q)
        want = rnd((x / s).astype(f32))
        assert np.array_equal(rnd(q1), want), s
        n += x.size
    assert n > 2_000_000

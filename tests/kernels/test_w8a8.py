import pytest
import torch

from _kernel_util import chained_calls_match, poison, randw, rel_err
from quantkit.kernels import _common, w8a8

CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (17, 70, 160), (33, 50, 100)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_int32_accumulation_exact(dev, M, N, K, split_k):
    g = torch.Generator().manual_seed(M + N + K + split_k)
    a = randw(g, (M, K), -127, 127, dev)
    w = randw(g, (N, K), -127, 127, dev)
    out = poison((M, N), torch.int32, dev)
    acc = w8a8.w8a8_int32_accumulate(a, w, config=dict(CFG, SPLIT_K=split_k), out=out)
    ref = a.cpu().long() @ w.cpu().long().t()  # integer matmul: CPU (CUDA has no int64 addmm)
    assert torch.equal(acc.cpu().long(), ref)


@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (3, 70, 160), (17, 50, 100)])
@pytest.mark.parametrize("fuse,split_k", [(True, 1), (False, 1), (False, 2), (True, 3)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_linear(dev, M, N, K, fuse, split_k, dtype):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(dtype).to(dev)
    q = randw(g, (N, K), -127, 127, dev)
    s = (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev)
    bias = torch.randn(N, generator=g).to(dev)
    W = w8a8.prepack_w8a8(q, s)
    out = poison((M, N), dtype, dev)
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=dict(CFG, FUSE_QUANT=fuse, SPLIT_K=split_k), out=out)
    ref = w8a8.w8a8_gemm_ref(x, W.w, W.scale, bias)
    assert rel_err(y, ref) <= 1e-2
    # sanity: the tolerance can fail (a wrong scale is far outside it)
    assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale * 1.05, bias)) > 1e-2


@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (3, 70, 160), (16, 50, 100), (17, 64, 256), (40, 33, 520), (2, 24, 20000)])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_quant_once_matches_the_two_launch_path(dev, M, N, K, split_k, dtype):
    """QUANT_ONCE (one launch: the first programs to arrive quantize x into a scratch, the rest wait for it) gives
    the two-launch path's output bit for bit, bias on and off, new activations each call (the scratch is
    rewritten), and leaves its counters at zero (what the next launch or graph replay starts from)."""
    g = torch.Generator().manual_seed(M * N + K + split_k)
    q = randw(g, (N, K), -127, 127, dev)
    s = (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev)
    W = w8a8.prepack_w8a8(q, s)
    cfg = dict(CFG, SPLIT_K=split_k)
    for bias in (None, torch.randn(N, generator=g).to(dev)):
        for _ in range(2):
            x = (torch.randn(M, K, generator=g) * 3).to(dtype).to(dev)
            ref = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=cfg, out=poison((M, N), dtype, dev))
            y = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=dict(cfg, QUANT_ONCE=True),
                                        out=poison((M, N), dtype, dev))
            assert torch.equal(y, ref)
            assert w8a8.once_counters(dev)[:4].tolist() == [0, 0, 0, 0]
            assert not w8a8._once_maxima(x.device, x.shape[0]).any()
    assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale, bias)) <= 1e-2
    assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale * 1.05, bias)) > 1e-2  # the tolerance can fail


def test_w8a8_quant_once_with_mixed_rows(dev):
    """Mixed INT8/FP16 rows on a QUANT_ONCE config: the same output as the two-launch mixed path, bit for bit."""
    from quantkit.kernels import mixed

    g = torch.Generator().manual_seed(5)
    M, N, K = 19, 48, 160
    q = randw(g, (N, K), -127, 127, dev)
    W = w8a8.prepack_w8a8(q, (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev))
    w16 = (torch.randn(N, K, generator=g) * 0.02).half().to(dev)
    x = torch.randn(M, K, generator=g).half().to(dev)
    rb = (torch.rand(M, generator=g) < 0.4).to(torch.uint8).to(dev)
    cfg = dict(CFG, SPLIT_K=2)
    ref = mixed.mixed_linear_triton(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, None, config=cfg)
    y = mixed.mixed_linear_triton(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, None, config=dict(cfg, QUANT_ONCE=True))
    assert torch.equal(y, ref)
    fp = rb.bool()
    assert rel_err(y[fp], x[fp].float() @ w16.float().t()) <= 2e-3  # FP16 rows really ran on the FP16 weight


TMA = dict(BACKEND="tma", BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


@pytest.mark.parametrize("M,N,K", [(40, 48, 64), (33, 24, 96), (70, 40, 160)])  # ragged M and N: TMA clips
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_persistent_tma(dev, M, N, K, dtype):
    """BACKEND "tma" (persistent grid, tensor descriptors): the reference within tolerance, and bit for bit the
    tensor-core kernel's output on the same quantized activations (exact int32 sums, the same epilogue)."""
    if dev.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need Hopper or newer")
    g = torch.Generator().manual_seed(M * 7 + N + K)
    x = torch.randn(M, K, generator=g).to(dtype).to(dev)
    q = randw(g, (N, K), -127, 127, dev)
    s = (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev)
    W = w8a8.prepack_w8a8(q, s)
    for bias in (None, torch.randn(N, generator=g).to(dev)):
        out = poison((M, N), dtype, dev)
        assert w8a8.tma_applies(x, W.w, out)
        y = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=TMA, out=out)
        ref = w8a8.w8a8_gemm_ref(x, W.w, W.scale, bias)
        assert rel_err(y, ref) <= 1e-2
        assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale * 1.05, bias)) > 1e-2  # the tolerance can fail
        mma = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=dict(CFG, FUSE_QUANT=False))
        assert torch.equal(y, mma)
    from quantkit.kernels.act_quant import per_token_quant_ref

    aq, asc = per_token_quant_ref(x)
    y2 = w8a8.w8a8_gemm_q_triton(aq, asc, W.w, W.scale, None, dtype, config=TMA)
    assert torch.equal(y2, w8a8.w8a8_gemm_q_triton(aq, asc, W.w, W.scale, None, dtype, config=CFG))


def test_w8a8_tma_falls_back_where_it_cannot_run(dev):
    """K not a multiple of 16 (a row stride TMA cannot take), or operands that are not contiguous: the
    tensor-core kernel runs instead, still correct."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 40, generator=g).half().to(dev)
    W = w8a8.prepack_w8a8(randw(g, (24, 40), -127, 127, dev), torch.rand(24, 1, generator=g).to(dev) * 0.01 + 1e-3)
    out = poison((20, 24), torch.float16, dev)
    assert not w8a8.tma_applies(x, W.w, out)
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=TMA, out=out)
    assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale)) <= 1e-2
    assert not w8a8.tma_applies(x[:, :32], W.w[:, :32], out)  # not contiguous
    x32, w32, o32 = x[:, :32].contiguous(), W.w[:, :32].contiguous(), out[:, :16].contiguous()
    assert w8a8.tma_applies(x32, w32, o32)
    rb = torch.zeros(40, dtype=torch.uint8, device=dev)
    assert not w8a8.tma_applies(x32, w32, o32, rb[::2])  # mixed mode: row bits not contiguous
    assert not w8a8.tma_applies(x32, w32, o32, rb[:20], torch.zeros(16, 64, dtype=torch.float16, device=dev)[:, :32])


def test_w8a8_gluon_config_runs_the_tensor_core_kernel_where_gluon_cannot(dev):
    """A ``BACKEND="gluon"`` config where the Gluon kernel does not apply (no sm_90 GPU: the interpreter, CPU;
    a tile of no whole 64-row wgmma; mixed rows anywhere) runs the tl.dot kernel: bit for bit its output, plain and
    on quantized activations."""
    from quantkit.kernels import _gluon, w8a8_gluon

    g = torch.Generator().manual_seed(9)
    M, N, K = 24, 40, 64
    x = torch.randn(M, K, generator=g).half().to(dev)
    W = w8a8.prepack_w8a8(randw(g, (N, K), -127, 127, dev), torch.rand(N, 1, generator=g).to(dev) * 0.01 + 1e-3)
    glu = dict(BACKEND="gluon", BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    # BLOCK_M 16 is no whole 64-row wgmma: the tl.dot kernel on any device (on sm_90 too)
    a_q = torch.empty(M, K, dtype=torch.int8, device=dev)
    assert not w8a8_gluon.applies(a_q, W.w, poison((M, N), torch.float16, dev), glu)
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=glu, out=poison((M, N), torch.float16, dev))
    ref = w8a8.w8a8_gemm_ref(x, W.w, W.scale)
    assert rel_err(y, ref) <= 1e-2 and rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale * 1.05)) > 1e-2
    assert torch.equal(y, w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=dict(CFG, FUSE_QUANT=False)))
    # its PDL twin (the shipped H200 form) too: the programmatic launch exists on sm_90+ only, the result is the same
    y_pdl = w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=dict(glu, PDL=True),
                                    out=poison((M, N), torch.float16, dev))
    assert torch.equal(y_pdl, y)
    # its warp-specialized twin (where Gluon runs, plain calls take that kernel, mixed ones this one): one 4-warp MMA
    # tile of at most 128 x 128, plain calls, no K split
    ws = dict(glu, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_stages=4, WARP_SPECIALIZE=True)
    assert w8a8_gluon.warp_specialized(ws) and not w8a8_gluon.warp_specialized(ws, mixed=True)
    assert not w8a8_gluon.warp_specialized(dict(ws, SPLIT_K=2)) and not w8a8_gluon.warp_specialized(glu)
    assert not w8a8_gluon.warp_specialized(dict(ws, num_warps=8)) and not w8a8_gluon.warp_specialized(
        dict(ws, BLOCK_M=128, BLOCK_N=256)) and not w8a8_gluon.warp_specialized(dict(ws, num_stages=12))
    assert w8a8_gluon.warp_specialized(ws, out_bytes=4) and not w8a8_gluon.warp_specialized(
        dict(ws, BLOCK_M=128), out_bytes=4)  # two int32 128 x 128 store buffers and the ring do not fit
    y_ws = w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=ws, out=poison((M, N), torch.float16, dev))
    assert torch.equal(y_ws, y)
    # a mixed call with it runs the plain kernel on its tile, at most as deep a ring as lets two CTAs share an SM
    assert w8a8_gluon.mixed_tile(dict(ws, BLOCK_M=128)) == dict(glu, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128,
                                                                num_stages=3)
    assert w8a8_gluon.mixed_tile(ws) == dict(glu, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_stages=4)
    assert w8a8_gluon.mixed_tile(glu) is glu
    # MIXED_PASS (a warp-specialized config's mixed calls in two launches) keeps the config whole; elsewhere ignored
    mp = dict(ws, MIXED_PASS=True)
    assert w8a8_gluon.mixed_pass(mp) and w8a8_gluon.mixed_tile(mp) is mp
    assert not w8a8_gluon.mixed_pass(dict(glu, MIXED_PASS=True))
    assert w8a8_gluon.plain_tile(mp) == w8a8_gluon.mixed_tile(ws)
    # ... "walk": the same two launches, the second one walking the tiles one program an SM
    walk = dict(ws, MIXED_PASS="walk")
    assert w8a8_gluon.mixed_pass(walk) and w8a8_gluon.walks_fp16_rows(walk) and not w8a8_gluon.walks_fp16_rows(mp)
    assert w8a8_gluon.plain_tile(walk) == w8a8_gluon.mixed_tile(ws)
    # an entry's own MIXED config wins for mixed calls, and plain calls never see the key
    entry = dict(ws, MIXED=dict(glu, BLOCK_M=64))
    # (a one-slot ring is no Gluon config: that MIXED tile, num_stages 1, runs the tl.dot kernel; the Gluon kernel
    # would wait on a K tile it never loaded, which hung this test on an H100 in sessions 52-53)
    o64 = poison((M, N), torch.float16, dev)
    assert not w8a8_gluon.applies(a_q, W.w, o64, dict(glu, BLOCK_M=64))
    assert w8a8_gluon.applies(a_q, W.w, o64, dict(glu, BLOCK_M=64, num_stages=2)) == _gluon.available(a_q)
    assert w8a8.mixed_config(entry) == dict(glu, BLOCK_M=64) and w8a8.mixed_config(ws) == w8a8_gluon.mixed_tile(ws)
    assert w8a8._pick(x, M, N, K, entry) == ws and w8a8._pick(x, M, N, K, entry, mixed=True) == dict(glu, BLOCK_M=64)
    rb = (torch.arange(M) % 3 == 0).to(torch.uint8).to(dev)
    wf = (torch.randn(N, K, generator=g) * 0.02).half().to(dev)
    y_mix = w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=entry, row_bits=rb, w_fp16=wf,
                                    out=poison((M, N), torch.float16, dev))
    assert torch.equal(y_mix, w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=dict(glu, BLOCK_M=64),
                                                      row_bits=rb, w_fp16=wf))
    y_ws = w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=dict(glu, WARP_SPECIALIZE=True),
                                   out=poison((M, N), torch.float16, dev))
    assert torch.equal(y_ws, y)
    y_sk = w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=dict(glu, SPLIT_K=2),
                                   out=poison((M, N), torch.float16, dev))
    assert torch.equal(y_sk, y)
    from quantkit.kernels.act_quant import per_token_quant_ref

    aq, asc = per_token_quant_ref(x)
    y2 = w8a8.w8a8_gemm_q_triton(aq, asc, W.w, W.scale, None, torch.float16, config=glu)
    assert torch.equal(y2, w8a8.w8a8_gemm_q_triton(aq, asc, W.w, W.scale, None, torch.float16, config=CFG))


def test_gluon_host_descriptor_carries_what_the_launcher_reads():
    """The cached Gluon launch hands the launcher ``_HostDesc`` objects instead of ``TensorDescriptor``s: every
    field the launcher reads (base pointer, shape, strides, padding, tf32 rounding) equals the real one's."""
    from quantkit.kernels import _gluon, w8a8_gluon

    if w8a8_gluon.GLUON_ERROR is not None:
        pytest.skip(w8a8_gluon.GLUON_ERROR)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    a = torch.empty(300, 512, dtype=torch.int8)
    w = torch.empty(256, 512, dtype=torch.int8)
    c = torch.empty(300, 256, dtype=torch.bfloat16)
    for t, d in zip((a, w, c), w8a8_gluon.descriptors(a, w, c, cfg)):
        h = _gluon.HostDesc(t)
        assert h.base.data_ptr() == d.base.data_ptr() == t.data_ptr()
        assert list(h.shape) == list(d.shape) and list(h.strides) == list(d.strides)
        assert h.padding == d.padding and h.round_f32_to_tf32 == getattr(d, "round_f32_to_tf32", False)
    try:
        from triton.backends.driver import decompose_descriptor  # the launcher's path without descriptor metadata
    except ImportError:
        return
    plain = lambda xs: [x.data_ptr() if hasattr(x, "data_ptr") else x for x in xs]  # noqa: E731
    d = w8a8_gluon.descriptors(a, w, c, cfg)[2]
    assert plain(decompose_descriptor(_gluon.HostDesc(c))) == plain(decompose_descriptor(d))


def test_w8a8_large_m_paths_reuse_quantization_scratch_safely(dev):
    """The two-launch paths quantize into a per-device scratch: interleaved calls with other M and K (the
    scratch grown, then reused) give each call its own right output."""
    g = torch.Generator().manual_seed(4)
    layers = {K: w8a8.prepack_w8a8(randw(g, (32, K), -127, 127, dev), torch.rand(32, 1, generator=g).to(dev) * 0.01 + 1e-3)
              for K in (64, 96)}
    cfg = dict(CFG, FUSE_QUANT=False, BACKEND="gluon")
    for M, K in [(20, 64), (20, 96), (33, 64), (33, 64), (20, 64)]:
        x = torch.randn(M, K, generator=g).half().to(dev)
        W = layers[K]
        y = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=poison((M, 32), torch.float16, dev))
        assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale)) <= 1e-2, (M, K)
        assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale * 1.05)) > 1e-2


def test_w8a8_public_ops(dev):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, generator=g).half().to(dev)
    W = w8a8.prepack_w8a8(randw(g, (48, 64), -127, 127, dev), torch.rand(48, 1, generator=g).to(dev) * 0.01 + 1e-3)
    y = w8a8.w8a8_linear(x, W)
    assert y.shape == (2, 3, 48)
    assert rel_err(y.reshape(6, 48), w8a8.w8a8_gemm_ref(x.reshape(6, 64), W.w, W.scale)) <= 1e-2
    from quantkit.kernels.act_quant import per_token_quant

    aq, asc = per_token_quant(x.reshape(6, 64))
    y2 = w8a8.w8a8_gemm_q(aq, asc, W, None, torch.float16)
    assert rel_err(y2, y.reshape(6, 48)) <= 1e-3
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        f = torch.ops.quantkit.w8a8_linear(torch.empty(5, 64, dtype=torch.float16),
                                           torch.empty(48, 64, dtype=torch.int8), torch.empty(48), None)
    assert f.shape == (5, 48) and f.dtype == torch.float16


def test_prepack_rejects_bad_input():
    with pytest.raises(ValueError):
        w8a8.prepack_w8a8(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 2))  # grouped scales
    with pytest.raises(ValueError):
        w8a8.prepack_w8a8(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1), torch.ones(4, 1, dtype=torch.int8))


@pytest.mark.parametrize("M,N,K,split_k,bk", [(1, 40, 96, 1, 32), (1, 70, 256, 3, 64), (3, 50, 160, 2, 64), (4, 64, 100, 2, 32)])
def test_w8a8_gemv(dev, M, N, K, split_k, bk):
    """GEMV path (fused per-token quant, fp32 accumulation of exact int products, split-K)."""
    g = torch.Generator().manual_seed(7 * M + N + K)
    x = torch.randn(M, K, generator=g).half().to(dev)
    q = randw(g, (N, K), -127, 127, dev)
    s = (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev)
    bias = torch.randn(N, generator=g).to(dev)
    W = w8a8.prepack_w8a8(q, s)
    cfg = dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=bk, SPLIT_K=split_k, num_warps=4, num_stages=1)
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=cfg, out=poison((M, N), torch.float16, dev))
    ref = w8a8.w8a8_gemm_ref(x, W.w, W.scale, bias)
    assert rel_err(y, ref) <= 2e-3
    assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale * 1.01, bias)) > 2e-3


@pytest.mark.parametrize("M", [2, 7, 16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_w8a8_gemv_multirow(dev, M, split_k):
    """GEMV path for 1 < M <= 16 (3-D int32 partials; dp4a on GPU, its shift emulation here)."""
    N, K = 36, 164  # K % 4 == 0, not a multiple of BLOCK_K
    g = torch.Generator().manual_seed(5 * M + split_k)
    x = (torch.randn(M, K, generator=g) * 3).half().to(dev)
    q = randw(g, (N, K), -127, 127, dev)
    s = (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev)
    W = w8a8.prepack_w8a8(q, s)
    cfg = dict(BACKEND="gemv", BLOCK_N=16, BLOCK_K=64, SPLIT_K=split_k, num_warps=4, num_stages=1)
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=cfg, out=poison((M, N), torch.float16, dev))
    # exact int32 accumulation: compare with the reference on the same quantized activations
    ref = w8a8.w8a8_gemm_ref(x, W.w, W.scale)
    assert rel_err(y, ref) <= 2e-3
    assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale * 1.01)) > 2e-3


@pytest.mark.parametrize("M,N,K,split_k,bk", [(1, 40, 96, 1, 32), (1, 70, 260, 3, 64), (3, 36, 164, 2, 64),
                                             (16, 20, 128, 2, 32)])
def test_w8a8_gemv_fused_quant(dev, M, N, K, split_k, bk):
    """One-launch GEMV (FUSE_QUANT: the kernel quantizes x itself) gives exactly the two-launch result
    (same integers, same int32 sums), with the row max taken over all of K by every split."""
    g = torch.Generator().manual_seed(11 * M + N + K)
    x = (torch.randn(M, K, generator=g) * 2).half().to(dev)
    x[:, -1] = 9.0  # the row max sits in the last K slice: a split that misses it would scale wrongly
    q = randw(g, (N, K), -127, 127, dev)
    s = (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev)
    bias = torch.randn(N, generator=g).to(dev)
    W = w8a8.prepack_w8a8(q, s)
    cfg = dict(BACKEND="gemv", BLOCK_N=16, BLOCK_K=bk, SPLIT_K=split_k, num_warps=4, num_stages=1)
    two = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=cfg, out=poison((M, N), torch.float16, dev))
    one = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=dict(cfg, FUSE_QUANT=True),
                                  out=poison((M, N), torch.float16, dev))
    assert torch.equal(one, two)
    # PDL: the GEMV launched programmatically after the quantization (sm_90+; elsewhere the flag is dropped)
    for c in (dict(cfg, LOAD_STAGES=3), dict(cfg, FUSE_QUANT=True, LOAD_STAGES=2),  # loads through a cp.async ring
              dict(cfg, BLOCK_N=2, BLOCK_K=1024, SPLIT_K=1), dict(cfg, FUSE_QUANT=True, BLOCK_N=1, BLOCK_K=512),
              dict(cfg, PDL=True), dict(cfg, BLOCK_N=1, BLOCK_K=1024, SPLIT_K=1, PDL=True),
              dict(cfg, PDL=True, PREFETCH=2), dict(cfg, BLOCK_N=1, BLOCK_K=1024, SPLIT_K=1, PDL=True, PREFETCH=4),
              dict(cfg, PDL=True, PDL_CHAIN=True), dict(cfg, BLOCK_N=1, BLOCK_K=1024, SPLIT_K=1, PDL=True,
                                                        PDL_CHAIN=True)):  # (the chain: see the GPU test below)
        y = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=c, out=poison((M, N), torch.float16, dev))
        assert torch.equal(y, one), c
        const = w8a8._gemv_plan(c, M, N, K, x.device, True, False, False)[4]
        assert const["PDL"] == (bool(c.get("PDL")) and _common.pdl_supported(x.device)), c
        assert const["CHAIN"] == (const["PDL"] and bool(c.get("PDL_CHAIN"))), c
    assert not w8a8._gemv_plan(dict(cfg, PDL=True, FUSE_QUANT=True), M, N, K, x.device, True, False, False)[4]["PDL"]
    # PREFETCH: only with PDL (nothing to overlap otherwise), a power of two (the pointer tile is a Triton range)
    assert _common.prefetch_steps(dict(cfg, PREFETCH=4), True) == 4
    assert _common.prefetch_steps(dict(cfg, PREFETCH=4), False) == 0 == _common.prefetch_steps(cfg, True)
    with pytest.raises(ValueError, match="power of two"):
        _common.prefetch_steps(dict(cfg, PREFETCH=3), True)
    ref = w8a8.w8a8_gemm_ref(x, W.w, W.scale, bias)
    assert rel_err(one, ref) <= 2e-3
    assert rel_err(one, w8a8.w8a8_gemm_ref(x, W.w, W.scale * 1.01, bias)) > 2e-3
    # mixed INT8/FP16 rows (the runtime's bitmask) on the fused kernel: the same bits as the two-launch kernel
    wf = (torch.randn(N, K, generator=g) * 0.02).half().to(dev)
    rb = (torch.arange(M) % 2).to(torch.uint8).to(dev)
    mixed = [w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=c, out=poison((M, N), torch.float16, dev),
                                     row_bits=rb, w_fp16=wf) for c in (cfg, dict(cfg, FUSE_QUANT=True),
                                                                       dict(cfg, PDL=True))]
    assert torch.equal(mixed[0], mixed[1]) and torch.equal(mixed[0], mixed[2])
    i8 = rb == 0
    assert torch.equal(mixed[1][i8], one[i8])  # INT8 rows bit-identical to the plain path
    if (~i8).any():
        fp = x[~i8].float() @ wf.float().t() + bias
        assert rel_err(mixed[1][~i8], fp) <= 2e-3


@pytest.mark.parametrize("M", [1, 16])
def test_eager_config_runs_outside_a_graph_capture(dev, monkeypatch, M):
    """An entry's ``EAGER`` config (here the one-launch fused GEMV, or QUANT_ONCE's tl.dot tile) is what a call runs
    outside a CUDA-graph capture, the plain two-launch config under one (a real capture replayed on new input on a
    GPU; the capture test forced on the CPU) and in a mixed call; each gives the reference's result."""
    N, K = 48, 256
    g = torch.Generator().manual_seed(5 + M)
    x = (torch.randn(M, K, generator=g) * 2).half().to(dev)
    W = w8a8.prepack_w8a8(randw(g, (N, K), -127, 127, dev), (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev))
    gemv = dict(BACKEND="gemv", BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=1)
    eager = (dict(gemv, FUSE_QUANT=True) if M == 1 else
             dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1, QUANT_ONCE=True))
    cfg = dict(gemv, EAGER=eager)
    quantized = []
    q_launch = w8a8._quantize_into_scratch
    monkeypatch.setattr(w8a8, "_quantize_into_scratch", lambda *a, **k: quantized.append(1) or q_launch(*a, **k))
    ref = w8a8.w8a8_gemm_ref(x, W.w, W.scale)
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=poison((M, N), torch.float16, dev))
    assert not quantized and rel_err(y, ref) <= 2e-3  # one launch
    assert w8a8._pick(x, M, N, K, cfg) == eager
    if dev.type == "cuda":
        xs, out = x.clone(), poison((M, N), torch.float16, dev)
        w8a8.w8a8_linear_triton(xs, W.w, W.scale, config=gemv, out=out)  # compiled and its buffers made first
        quantized.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            w8a8.w8a8_linear_triton(xs, W.w, W.scale, config=cfg, out=out)
        x2 = (torch.randn(M, K, generator=g) * 3).half().to(dev)
        xs.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        y, ref = out, w8a8.w8a8_gemm_ref(x2, W.w, W.scale)
    else:
        monkeypatch.setattr(w8a8, "capturing", lambda t: True)
        y = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=poison((M, N), torch.float16, dev))
    assert quantized == [1] and rel_err(y, ref) <= 2e-3  # the plain entry: quantization, then the GEMV
    monkeypatch.setattr(w8a8, "capturing", lambda t: False)
    rb = torch.zeros(M, dtype=torch.uint8, device=dev)
    assert w8a8._pick(x, M, N, K, cfg, mixed=True) == w8a8.mixed_config(gemv)  # mixed calls: the plain entry's
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=poison((M, N), torch.float16, dev), row_bits=rb)
    assert len(quantized) == 2 and rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale)) <= 2e-3


@pytest.mark.parametrize("M", [1, 5])
def test_pdl_launch_gives_the_two_launch_result(dev, M):
    """``PDL`` configs (the GEMM launched programmatically after the quantization, sm_90+; dropped elsewhere) give
    the plain two-launch result bit for bit, the GEMV and the tl.dot kernel, eager and (GPU) in a CUDA graph
    replayed on new input."""
    N, K = 40, 128
    g = torch.Generator().manual_seed(3 + M)
    x = (torch.randn(M, K, generator=g) * 2).half().to(dev)
    W = w8a8.prepack_w8a8(randw(g, (N, K), -127, 127, dev), (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev))
    bias = torch.randn(N, generator=g).half().to(dev)
    for cfg in (dict(BACKEND="gemv", BLOCK_N=1, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=2),
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_K=1)):
        two = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=cfg, out=poison((M, N), torch.float16, dev))
        assert rel_err(two, w8a8.w8a8_gemm_ref(x, W.w, W.scale, bias)) <= 2e-3
        pdl = dict(cfg, PDL=True, PREFETCH=2)  # (PREFETCH: the GEMV's first weights asked of L2 before the wait)
        for c in (dict(cfg, PDL=True), pdl):
            y = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=c, out=poison((M, N), torch.float16, dev))
            assert torch.equal(y, two), c
        if dev.type == "cuda":
            xs, out = x.clone(), torch.empty(M, N, dtype=torch.float16, device=dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                w8a8.w8a8_linear_triton(xs, W.w, W.scale, bias, config=pdl, out=out)
            x2 = (torch.randn(M, K, generator=g) * 3).half().to(dev)
            xs.copy_(x2)
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, w8a8.w8a8_linear_triton(x2, W.w, W.scale, bias, config=cfg)), cfg


def test_fast_launch_reuses_and_respecializes(dev):
    """The cached-launch path gives the same results as the first (ordinary) launch, and a new
    specialization class (unaligned view, different dtype) gets its own compiled kernel."""
    from quantkit.kernels import _common

    g = torch.Generator().manual_seed(3)
    N, K = 40, 96
    q = randw(g, (N, K), -127, 127, dev)
    W = w8a8.prepack_w8a8(q, (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev))
    for dtype in (torch.float16, torch.bfloat16):
        xs = torch.randn(4, K + 8, generator=g).to(dtype).to(dev)
        for x in (xs[:, :K], xs[:, 4:4 + K]):  # second view: data pointer + 8 bytes (not 16-aligned)
            for _ in range(3):
                y = w8a8.w8a8_linear_triton(x, W.w, W.scale, out=poison((4, N), dtype, dev))
                assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale)) <= 1e-2
    assert _common.fast_launch is not None


def test_cached_buffers_outlive_their_replacement():
    """A kernel buffer that grows is replaced, never freed: a CUDA graph captured with the old one (a decode step)
    still reads and writes it by address after a larger call (a prefill) grew it. Growth at least doubles, so what
    is kept stays below the live buffer's size."""
    import gc
    import weakref

    from quantkit.kernels import _common

    dev = torch.device("cpu")
    old = _common.cached_buffer(dev, torch.int32, 5000, zero=True, tag="test_grow")
    ref = weakref.ref(old)
    del old
    new = _common.cached_buffer(dev, torch.int32, 6000, zero=True, tag="test_grow")
    gc.collect()
    assert ref() is not None and ref() is not new  # replaced, still alive
    assert new.numel() >= 2 * 5000 and not new.any()
    assert ref().numel() <= new.numel() // 2
    assert _common.cached_buffer(dev, torch.int32, 7000, zero=True, tag="test_grow") is new  # fits: no growth


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch: sm_90+")
@pytest.mark.parametrize("bn,bk,split_k", [(1, 1024, 1), (4, 512, 1), (128, 128, 8)])
def test_w8a8_gemv_pdl_chain_reads_the_previous_calls_output(bn, bk, split_k):
    """``PDL_CHAIN``: the GEMV lets the next launch start at once, and the next call's quantization, launched
    programmatically, waits on the GPU for it before reading x or rewriting the scratch the GEMV reads. A chain of
    calls, each one's input the previous one's output (N = K; the activation scratch and split-K buffers shared),
    eager and replayed from a CUDA graph with every output poisoned before the replay, is bit for bit the chain of
    plain PDL calls: a quantization that started too early would read a stale input or overwrite the scratch under
    the GEMV still reading it."""
    N = K = 2048
    g = torch.Generator().manual_seed(5)
    q = randw(g, (N, K), -127, 127, "cuda")
    s = (torch.rand(N, 1, generator=g) * 1e-4 + 2.5e-4).to("cuda")  # ~1 / (sqrt(K) std(q)): |y| stays near |x|
    W = w8a8.prepack_w8a8(q, s)
    plain = dict(BACKEND="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, num_warps=4, num_stages=2, PDL=True)
    chain = dict(plain, PDL_CHAIN=True)
    assert w8a8._gemv_plan(chain, 1, N, K, torch.device("cuda"), False, False, False)[4]["CHAIN"]
    x0 = torch.randn(1, K, device="cuda", dtype=torch.float16)
    call = lambda x, cfg, y: w8a8.w8a8_linear_triton(x, W.w, W.scale, None, config=cfg, out=y)  # noqa: E731
    want = chained_calls_match(call, x0, plain, chain)
    assert rel_err(want[0], w8a8.w8a8_gemm_ref(x0, W.w, W.scale)) <= 2e-3

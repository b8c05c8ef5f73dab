"""GPU tests (H100/H200): the issue's shape grid through the public ops with shipped configs."""

import pytest
import torch

from _kernel_util import chained_calls_match, poison, randw, rel_err
from quantkit.kernels import _common, act_quant, mixed, w8a8, wna16

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MS = [1, 3, 8, 16, 17, 100]
SHAPES = [(1000, 1152), (4000, 1408), (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"N{s[0]}_K{s[1]}")
def layer(request):
    N, K = request.param
    g = torch.Generator().manual_seed(N + K)
    q8 = randw(g, (N, K), -127, 127, "cuda")
    s8 = (torch.rand(N, 1, generator=g) * 2e-3 + 5e-4).cuda()
    q4 = randw(g, (N, K), -8, 7, "cuda")
    s4 = (torch.rand(N, K // 128, generator=g) * 2e-2 + 5e-3).cuda()
    z4 = randw(g, (N, K // 128), -8, 7, "cuda")
    w16 = (torch.randn(N, K, generator=g) * 0.02).half().cuda()
    return dict(N=N, K=K, q8=q8, s8=s8, q4=q4, s4=s4, z4=z4, w16=w16,
                W8=w8a8.prepack_w8a8(q8, s8), Wi8=wna16.prepack_wna16(q8, s8, None, 8),
                Wi4=wna16.prepack_wna16(q4, s4, None, 4), Wi4z=wna16.prepack_wna16(q4, s4, z4, 4))


@pytest.mark.parametrize("M", MS)
def test_grid(layer, M):
    N, K = layer["N"], layer["K"]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    # per-token quant: exact (IEEE scale and quotient, as the reference)
    q, s = act_quant.per_token_quant_triton(x, out_q=poison((M, K), torch.int8, "cuda"),
                                            out_s=poison((M, 1), torch.float32, "cuda"))
    qr, sr = act_quant.per_token_quant_ref(x)
    assert torch.equal(s, sr) and torch.equal(q, qr)
    # int32 accumulation exact
    acc = w8a8.w8a8_int32_accumulate(qr, layer["W8"].w, out=poison((M, N), torch.int32, "cuda"))
    ref_acc = (qr.double() @ layer["q8"].double().t()).long()
    assert torch.equal(acc.long(), ref_acc)
    for name, W, q_, s_, z_ in [("w4", layer["Wi4"], layer["q4"], layer["s4"], None),
                                ("w4z", layer["Wi4z"], layer["q4"], layer["s4"], layer["z4"]),
                                ("w8", layer["Wi8"], layer["q8"], layer["s8"], None)]:
        y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, W.bits, W.group_size, N, K,
                                      out=poison((M, N), torch.float16, "cuda"))
        assert rel_err(y, wna16.wna16_gemm_ref(x, q_, s_, z_)) <= 1e-2, name
    y = w8a8.w8a8_linear_triton(x, layer["W8"].w, layer["W8"].scale, out=poison((M, N), torch.float16, "cuda"))
    assert rel_err(y, w8a8.w8a8_gemm_ref(x, layer["W8"].w, layer["W8"].scale)) <= 1e-2
    rb = (torch.rand(M, device="cuda") < 0.5).to(torch.uint8)
    for wf in (layer["w16"], None):
        y = mixed.mixed_linear_triton(x, layer["W8"].w, layer["W8"].scale, wf, mixed.CTRL_ROW_BITS, rb,
                                      out=poison((M, N), torch.float16, "cuda"))
        ref = mixed.mixed_gemm_ref(x, layer["W8"].w, layer["W8"].scale, wf, mixed.CTRL_ROW_BITS, rb)
        assert rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("M", [256, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_rows_at_large_m_keep_the_shipped_kernel(layer, dtype, M):
    """M=256 and 2048 with the shipped configs (the tl.dot kernel with the register cap and the FP16 loop on
    descriptors at 256; Gluon or the persistent TMA kernel at 2048 where a GPU file chose it): a few FP16
    64-token groups, as the runtime lays a batch out; INT8 rows bit for bit the plain W8A8 call's."""
    N, K, W = layer["N"], layer["K"], layer["W8"]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    rb = torch.zeros(M, dtype=torch.uint8, device="cuda")
    rb[128:192] = 1
    rb[1000:1064] = 1
    wf = layer["w16"].to(dtype)
    plain = w8a8.w8a8_linear_triton(x, W.w, W.scale)
    y = mixed.mixed_linear_triton(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb, out=poison((M, N), dtype, "cuda"))
    fp = rb.bool()
    assert torch.equal(y[~fp], plain[~fp])
    ref = mixed.mixed_gemm_ref(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb)
    assert rel_err(y[fp], ref[fp]) <= 1e-2
    assert rel_err(y[fp], plain[fp]) > 1e-1  # w16 is an independent weight: the FP16 rows did run on it


@pytest.mark.parametrize("cfg", [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, BLOCK_KF=64),
                                 dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, BLOCK_KF=128),
                                 dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, BLOCK_KF=128)],
                         ids=["128x128x256-kf64", "128x128x256-kf128", "128x128x128-kf128"])
def test_tma_mixed_fp16_rows_where_depth_three_went_wrong(cfg):
    """Configs whose 3-deep descriptor-fed FP16 loop wrote wrong FP16 rows on an H100 (relative error 0.11-0.17):
    asked for depth 3, the launch now runs them 2 deep (w8a8._desc_stages_f) and they match the reference."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need Hopper or newer")
    N = K = 4096
    M = 512
    g = torch.Generator().manual_seed(3)
    W = w8a8.prepack_w8a8(randw(g, (N, K), -127, 127, "cuda"), (torch.rand(N, 1, generator=g) * 1e-3 + 1e-4).cuda())
    w16 = (torch.randn(N, K, generator=g) * 0.02).half().cuda()
    x = torch.randn(M, K, generator=g).half().cuda()
    rb = torch.ones(M, dtype=torch.uint8, device="cuda")
    rb[:64] = 0  # one all-INT8 row group
    full = dict(cfg, BACKEND="tma", GROUP_M=8, num_warps=8, num_stages=3, STAGES_F=3)
    y = mixed.mixed_linear_triton(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, None, config=full,
                                  out=poison((M, N), torch.float16, "cuda"))
    ref = mixed.mixed_gemm_ref(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb)
    assert rel_err(y, ref) <= 1e-2


# The persistent TMA kernel at both tile shapes the H200 file ships: forced, so every Hopper GPU runs it (the
# shipped configs choose it on the H200 only; elsewhere the heuristics never do).
TMA_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, BACKEND="tma"),
               dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, BACKEND="tma")]
MMA_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, FUSE_QUANT=False)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="TMA needs Hopper or newer")
@pytest.mark.parametrize("M", [2048, 1000])
@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=["128x256", "256x128"])
def test_tma_kernel_plain_and_mixed_match_the_tensor_core_kernel(layer, M, cfg):
    """Plain W8A8 through the TMA kernel equals the tensor-core kernel bit for bit (both accumulate exactly in
    int32 and share the epilogue); mixed rows on it: INT8 rows equal that too, FP16 rows match the reference."""
    if layer["N"] * layer["K"] > 6144 * 4096 and layer["K"] != 14336:
        pytest.skip("keep the GPU test short")
    N, K, W = layer["N"], layer["K"], layer["W8"]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    assert w8a8.tma_applies(x, W.w, torch.empty(M, N, device="cuda", dtype=torch.float16))
    mma = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=MMA_CONFIG)
    tma = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=poison((M, N), torch.float16, "cuda"))
    assert torch.equal(tma, mma)
    assert rel_err(tma, w8a8.w8a8_gemm_ref(x, W.w, W.scale)) <= 1e-2
    rb = torch.zeros(M, dtype=torch.uint8, device="cuda")
    rb[64:128] = 1
    rb[M - 40:] = 1  # the ragged last tile too
    wf = layer["w16"]
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, row_bits=rb, w_fp16=wf,
                                out=poison((M, N), torch.float16, "cuda"))
    fp = rb.bool()
    assert torch.equal(y[~fp], mma[~fp])
    ref = mixed.mixed_gemm_ref(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb)
    assert rel_err(y[fp], ref[fp]) <= 1e-2


# The Gluon kernel (INT8 wgmmas kept in flight) at the tiles benchmarks/gemm.py --tune searches
GLUON_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3, BACKEND="gluon"),
                 dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=5, BACKEND="gluon"),
                 dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, BACKEND="gluon"),
                 dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=5, BACKEND="gluon"),
                 dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, BACKEND="gluon"),
                 # K splits: 2, and 3 (uneven shares of 32 and 112 K tiles)
                 dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, BACKEND="gluon",
                      SPLIT_K=2),
                 dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, BACKEND="gluon",
                      SPLIT_K=3)]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="Gluon's wgmma kernel is sm_90 only")
@pytest.mark.parametrize("M", [2048, 1000, 77])
@pytest.mark.parametrize("cfg", GLUON_CONFIGS,
                         ids=["128x128x128", "128x128x64", "256x128x128", "256x128x64", "64x128x128", "64x128x128-sk2",
                              "128x128x128-sk3"])
def test_gluon_kernel_matches_the_tensor_core_kernel(layer, M, cfg):
    """Plain W8A8 through the Gluon kernel equals the tl.dot kernel bit for bit (exact int32 accumulation, the
    same epilogue formula), with and without bias, fp16 and bf16; its int32 accumulator is exact. Mixed rows in
    the same Gluon launch, on an FP16 copy and on the int8 weight, with and without bias. With a K split too (the
    int32 partials summed exactly: the same bits; FP16 rows' fp32 partials summed by the last split)."""
    from quantkit.kernels import w8a8_gluon

    assert w8a8_gluon.GLUON_ERROR is None, w8a8_gluon.GLUON_ERROR
    if layer["N"] * layer["K"] > 6144 * 4096 and layer["K"] != 14336:
        pytest.skip("keep the GPU test short")
    N, K, W = layer["N"], layer["K"], layer["W8"]
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        bias = torch.randn(N, device="cuda", dtype=dtype)
        assert w8a8_gluon.applies(torch.empty(M, K, device="cuda", dtype=torch.int8), W.w,
                                  torch.empty(M, N, device="cuda", dtype=dtype), cfg)
        assert not w8a8_gluon.applies(torch.empty(M, K, device="cuda", dtype=torch.int8), W.w,
                                      torch.empty(M, N, device="cuda", dtype=dtype), dict(cfg, BLOCK_M=32))
        for b in (None, bias):
            mma = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=MMA_CONFIG)
            glu = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=cfg, out=poison((M, N), dtype, "cuda"))
            assert torch.equal(glu, mma), (dtype, b is not None, (glu.float() - mma.float()).abs().max().item())
        assert rel_err(glu, w8a8.w8a8_gemm_ref(x, W.w, W.scale, bias)) <= 1e-2
    a_q, a_s = act_quant.per_token_quant_triton(x)
    acc = w8a8_gluon.launch(a_q, None, W.w, None, None, poison((M, N), torch.int32, "cuda"), cfg)
    assert torch.equal(acc.long(), (a_q.double() @ layer["q8"].double().t()).long())
    # mixed rows in the Gluon launch (FP16 rows from its fp16/bf16 wgmma loop, on the copy or the int8 weight):
    # INT8 rows bit for bit the plain call's, FP16 rows against the reference; no FP16 row: the plain output
    wf = layer["w16"].to(x.dtype)
    for b in (None, bias):
        plain = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=cfg)
        for lo, hi in ((M // 3, M // 3 + 40), (0, 0), (0, M)):
            rb = torch.zeros(M, dtype=torch.uint8, device="cuda")
            rb[lo:hi] = 1
            for w16 in (wf, None):
                assert w8a8_gluon.applies_mixed(x, w16, plain, cfg)  # the Gluon launch, not the tl.dot fallback
                y = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=cfg, row_bits=rb, w_fp16=w16,
                                            out=poison((M, N), x.dtype, "cuda"))
                fp = rb.bool()
                assert torch.equal(y[~fp], plain[~fp]), (lo, hi)
                ref = mixed.mixed_gemm_ref(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, b)
                assert rel_err(y, ref) <= 1e-2, (lo, hi, w16 is None, b is None)
                if hi > lo:
                    assert rel_err(y[fp], plain[fp]) > 1e-3  # the FP16 rows are not the INT8 result


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="Gluon's wgmma kernel is sm_90 only")
def test_gluon_cached_launch_and_graph_capture(layer, monkeypatch):
    """After the first launch the Gluon kernel is launched directly (no descriptors built, no JIT binding): new
    inputs and outputs each call, bias on and off, fp16 and bf16, bit for bit the tl.dot kernel's result; the
    same call captured in a CUDA graph and replayed on new input data too."""
    from quantkit.kernels import w8a8_gluon

    if layer["N"] * layer["K"] > 6144 * 4096:
        pytest.skip("keep the GPU test short")
    N, K, W = layer["N"], layer["K"], layer["W8"]
    cfg, M = GLUON_CONFIGS[3], 1000
    for dtype in (torch.float16, torch.bfloat16):
        for b in (None, torch.randn(N, device="cuda", dtype=dtype)):
            w8a8.w8a8_linear_triton(torch.randn(M, K, device="cuda", dtype=dtype), W.w, W.scale, b, config=cfg)
    assert w8a8_gluon._LAUNCH.compiled and _common.fast_ready()

    _forbid_descriptors(monkeypatch)
    _matches_tl_dot(W, M, N, K, cfg)
    _graph_replays_match(W, torch.randn(M, K, device="cuda", dtype=torch.float16), cfg, MMA_CONFIG)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="Gluon's wgmma kernel is sm_90 only")
@pytest.mark.parametrize("M", [256, 77])
@pytest.mark.parametrize("cfg", [GLUON_CONFIGS[0], GLUON_CONFIGS[4], GLUON_CONFIGS[5]],
                         ids=["128x128x128", "64x128x128", "64x128x128-sk2"])
def test_gluon_pdl_launch_gives_the_two_launch_result(layer, M, cfg):
    """``PDL`` on a Gluon config (the GEMM launched programmatically while the quantization runs, its weight tiles
    loaded before it waits): bit for bit the plain launch's result, plain and mixed mode, each call on new
    activations (a read of the quantized activations before the wait would see the previous call's), and in a
    CUDA graph replayed on new input."""
    if layer["N"] * layer["K"] > 6144 * 4096:
        pytest.skip("keep the GPU test short")
    N, K, W = layer["N"], layer["K"], layer["W8"]
    pdl = dict(cfg, PDL=True)
    rb = torch.zeros(M, dtype=torch.uint8, device="cuda")
    rb[M // 4: M // 4 + 20] = 1
    for dtype in (torch.float16, torch.bfloat16):
        wf = layer["w16"].to(dtype)
        for b in (None, torch.randn(N, device="cuda", dtype=dtype)):
            for bits in (None, rb):
                for scale in (1.0, 5.0, 0.2):
                    x = torch.randn(M, K, device="cuda", dtype=dtype) * scale
                    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=pdl, row_bits=bits, w_fp16=wf,
                                                out=poison((M, N), dtype, "cuda"))
                    ref = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=cfg, row_bits=bits, w_fp16=wf)
                    assert torch.equal(y, ref), (dtype, b is not None, bits is not None, scale)
    _graph_replays_match(W, torch.randn(M, K, device="cuda", dtype=torch.float16), pdl, cfg)


def _walking_kernel_checks(layer, M, cfg, int32, monkeypatch):
    """The warp-specialized Gluon form (``cfg``) bit for bit the tl.dot kernel (fp16 / bf16, with and without bias, each
    twice: the second call is the cached direct launch); with ``int32`` the raw int32 accumulator exact; a mixed call
    runs the plain Gluon kernel on the same tile (``w8a8_gluon.mixed_tile``: its result that kernel's, at the
    config's own ring depth too); the cached launch builds no descriptor, and a CUDA graph replayed on new input is
    the tl.dot result."""
    from quantkit.kernels import w8a8_gluon

    N, K, W = layer["N"], layer["K"], layer["W8"]
    x = _matches_tl_dot(W, M, N, K, cfg)
    a_q, a_s = act_quant.per_token_quant_triton(x)
    if int32:
        acc = w8a8_gluon.launch(a_q, None, W.w, None, None, poison((M, N), torch.int32, "cuda"), cfg)
        assert torch.equal(acc.long(), (a_q.double() @ layer["q8"].double().t()).long())
    plain = w8a8_gluon.mixed_tile(cfg)
    assert not plain.get("WARP_SPECIALIZE") and plain["BLOCK_M"] == cfg["BLOCK_M"]
    rb = torch.zeros(M, dtype=torch.uint8, device="cuda")
    rb[M // 3: M // 3 + 20] = 1
    wf = layer["w16"].to(x.dtype)
    y = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, row_bits=rb, w_fp16=wf,
                                out=poison((M, N), x.dtype, "cuda"))
    for ref_cfg in (plain, dict(plain, num_stages=cfg["num_stages"])):
        assert torch.equal(y, w8a8.w8a8_linear_triton(x, W.w, W.scale, config=ref_cfg, row_bits=rb, w_fp16=wf))

    _forbid_descriptors(monkeypatch)
    _graph_replays_match(W, torch.randn(M, K, device="cuda", dtype=torch.float16), cfg, MMA_CONFIG)


def _matches_tl_dot(W, M, N, K, cfg):
    """The W8A8 call with Gluon config ``cfg`` bit for bit the tl.dot kernel's (fp16 / bf16, with and without bias,
    each twice: the second call takes the cached direct launch); returns the last activations."""
    for dtype in (torch.float16, torch.bfloat16):
        for b in (None, torch.randn(N, device="cuda", dtype=dtype)):
            for _ in range(2):
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                mma = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=MMA_CONFIG)
                glu = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=cfg, out=poison((M, N), dtype, "cuda"))
                assert torch.equal(glu, mma), (dtype, b is not None, (glu.float() - mma.float()).abs().max().item())
    return x


def _forbid_descriptors(monkeypatch, module=None, builder="descriptors"):
    """From here on a Gluon launch that builds TMA descriptors (``module.builder``, default
    ``w8a8_gluon.descriptors``) fails (a cached direct launch builds none)."""
    if module is None:
        from quantkit.kernels import w8a8_gluon as module

    def no_descriptors(*a, **k):
        raise AssertionError("the cached launch built TMA descriptors")

    monkeypatch.setattr(module, builder, no_descriptors)


WS_CONFIGS = [dict(GLUON_CONFIGS[0], num_stages=4, WARP_SPECIALIZE=True),
              dict(GLUON_CONFIGS[4], num_stages=5, GROUP_M=4, WARP_SPECIALIZE=True)]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="Gluon's wgmma kernel is sm_90 only")
@pytest.mark.parametrize("M", [2048, 1000, 77])
@pytest.mark.parametrize("cfg", WS_CONFIGS, ids=["128x128x128", "64x128x128"])
def test_gluon_warp_specialized_kernel_matches_the_tensor_core_kernel(layer, M, cfg, monkeypatch):
    """``WARP_SPECIALIZE``: a loader warp filling the ring across a program's tiles and two MMA warpgroups taking
    them in turn (M = 2048: several tiles each; M = 77: programs with one tile, the second MMA partition idle),
    bit for bit the tl.dot kernel (fp16 / bf16, with and without bias); the int32 accumulator exact; the cached
    direct launch and a CUDA graph replayed on new input the same; a mixed call runs the plain Gluon kernel."""
    from quantkit.kernels import w8a8_gluon

    if layer["N"] * layer["K"] > 6144 * 4096 and layer["K"] != 14336:
        pytest.skip("keep the GPU test short")
    assert w8a8_gluon.warp_specialized(cfg) and not w8a8_gluon.warp_specialized(cfg, mixed=True)
    tiles = -(-M // cfg["BLOCK_M"]) * -(-layer["N"] // cfg["BLOCK_N"])  # one program an SM, at most one a tile
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert w8a8_gluon.walk_programs(M, layer["N"], cfg, torch.device("cuda")) == min(tiles, sms)
    # (int32 store buffers fit the 64-row tile only)
    _walking_kernel_checks(layer, M, cfg, w8a8_gluon.warp_specialized(cfg, out_bytes=4), monkeypatch)
    # MIXED_PASS: every row by the warp-specialized kernel, then the FP16 rows' tiles again: bit for bit the plain
    # kernel's mixed result (FP16 rows in one M tile, spread over several, none, all; on the FP16 copy and on the
    # int8 weight; with bias); a program a tile, or one an SM walking the tiles ("walk"; its row bits read 64 M
    # tiles at once, and 2 at once so that several chunks, some without an FP16 row, are walked)
    monkeypatch.undo()
    N, K, W = layer["N"], layer["K"], layer["W8"]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    b = torch.randn(N, device="cuda", dtype=torch.float16)
    some = torch.zeros(M, dtype=torch.uint8, device="cuda")
    some[M // 2: M // 2 + 3] = 1
    spread = (torch.arange(M, device="cuda") % 97 == 5).to(torch.uint8)
    for form, chunk in ((True, 64), ("walk", 64), ("walk", 2)):
        monkeypatch.setattr(w8a8_gluon, "FP16_WALK_CHUNK", chunk)
        mp = dict(cfg, MIXED_PASS=form)
        assert w8a8_gluon.mixed_pass(mp) and w8a8_gluon.mixed_tile(mp) is mp and not w8a8_gluon.mixed_pass(cfg)
        assert w8a8_gluon.walks_fp16_rows(mp) == (form == "walk")
        for rb in (some, spread, torch.zeros_like(some), torch.ones_like(some)):
            for wf in (layer["w16"].half(), None):
                y = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=mp, row_bits=rb, w_fp16=wf,
                                            out=poison((M, N), torch.float16, "cuda"))
                ref = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=w8a8_gluon.plain_tile(cfg), row_bits=rb,
                                              w_fp16=wf)
                assert torch.equal(y, ref), (form, chunk, int(rb.sum()), wf is not None)


def _graph_replays_match(W, x, cfg, ref_cfg, replays=3):
    """The W8A8 call with `cfg`, captured in a CUDA graph and replayed on new data in `x`, equals a plain call
    with `ref_cfg` bit for bit after every replay."""
    M, N = x.shape[0], W.w.shape[0]
    out = poison((M, N), x.dtype, "cuda")
    w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=out)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=out)
    for _ in range(replays):
        x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, w8a8.w8a8_linear_triton(x, W.w, W.scale, config=ref_cfg))


W4_GLUON_CONFIGS = [dict(BACKEND="gluon", BLOCK_M=64, BLOCK_N=128, SPLIT_K=2, num_warps=4, num_stages=4),
                    dict(BACKEND="gluon", BLOCK_M=128, BLOCK_N=128, SPLIT_K=3, num_warps=8, num_stages=3),
                    dict(BACKEND="gluon", BLOCK_M=256, BLOCK_N=128, SPLIT_K=1, num_warps=8, num_stages=2),
                    dict(BACKEND="gluon", BLOCK_M=128, BLOCK_N=256, SPLIT_K=1, num_warps=8, num_stages=2),
                    dict(BACKEND="gluon", BLOCK_M=128, BLOCK_N=128, SPLIT_K=3, num_warps=8, num_stages=3, RS=True),
                    dict(BACKEND="gluon", BLOCK_M=64, BLOCK_N=64, SPLIT_K=1, num_warps=4, num_stages=4, RS=True)]
SM90_ONLY = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                               reason="Gluon's wgmma kernels are sm_90 only")


@SM90_ONLY
@pytest.mark.parametrize("M", [37, 128, 300])
@pytest.mark.parametrize("cfg", W4_GLUON_CONFIGS,
                         ids=["64x128-sk2", "128x128-sk3", "256x128", "128x256", "rs-128x128-sk3", "rs-64x64"])
def test_gluon_w4a16_matches_the_reference(layer, M, cfg):
    """W4A16 (symmetric, zero points; fp16 and bf16) and W8A16 through the Gluon kernels (RS: the register-operand
    one for 4-bit; 8-bit runs the shared-operand one) against the reference, with and without bias, split-K sums
    (uneven splits too) that reset their counters (a second call is equal)."""
    from quantkit.kernels import wna16_gluon

    if layer["N"] * layer["K"] > 6144 * 4096:
        pytest.skip("keep the GPU test short")
    N, K = layer["N"], layer["K"]
    for name, W, q_, s_, z_ in [("w4", layer["Wi4"], layer["q4"], layer["s4"], None),
                                ("w4z", layer["Wi4z"], layer["q4"], layer["s4"], layer["z4"]),
                                ("w8", layer["Wi8"], layer["q8"], layer["s8"], None)]:
        for dtype in (torch.float16, torch.bfloat16) if W.bits == 4 else (torch.float16, ):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            bias = torch.randn(N, device="cuda", dtype=dtype) * 0.1
            # a tile whose buffers do not fit (8-bit words are twice as many) runs the tl.dot plan instead
            fits = wna16_gluon.shared_bytes(cfg, W.bits) <= _common.HOPPER_SMEM_PER_BLOCK
            assert wna16_gluon.applies(x, W.qw, W.bits, N, K, cfg) == fits
            for b in (None, bias):
                y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, b, W.bits, W.group_size, N, K, config=cfg,
                                              out=poison((M, N), dtype, "cuda"))
                ref = wna16.wna16_gemm_ref(x, q_, W.scales.t().float(), z_, b)
                assert rel_err(y, ref) <= 5e-3, (name, dtype, b is not None, rel_err(y, ref))
                again = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, b, W.bits, W.group_size, N, K,
                                                  config=cfg)
                assert torch.equal(again, y), (name, dtype)
            assert rel_err(y, wna16.wna16_gemm_ref(x, q_, W.scales.t().float() * 1.02, z_, b)) > 5e-3


@SM90_ONLY
@pytest.mark.parametrize("gs", [32, 64, 256])
def test_gluon_w4a16_group_sizes_and_k_tail(gs):
    """Groups smaller than the 128-K block (a scale per field of the packed words), larger ones, and K not a
    multiple of 128 (TMA zero-fills x past K; the padded words hold 0)."""
    g = torch.Generator().manual_seed(gs)
    N, K, M = 520, 1280 - (gs == 32) * 96, 96
    q = randw(g, (N, K), -8, 7, "cuda")
    s = (torch.rand(N, K // gs, generator=g) * 2e-2 + 5e-3).cuda()
    z = randw(g, (N, K // gs), -8, 7, "cuda")
    W = wna16.prepack_wna16(q, s, z, 4)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    for cfg in (W4_GLUON_CONFIGS[1], W4_GLUON_CONFIGS[4]):  # groups < 128 take the shared-operand kernel either way
        y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, gs, N, K, config=cfg,
                                      out=poison((M, N), torch.float16, "cuda"))
        assert rel_err(y, wna16.wna16_gemm_ref(x, q, W.scales.t().float(), z)) <= 5e-3, cfg


@SM90_ONLY
def test_gluon_w4a16_cached_launch_and_graph_capture(monkeypatch):
    """After the first launch the Gluon W4A16 kernel is launched directly (no TMA descriptors built); a call
    captured in a CUDA graph and replayed on new input data equals a plain call."""
    from quantkit.kernels import wna16_gluon

    g = torch.Generator().manual_seed(5)
    N, K, M = 1024, 2048, 128
    q, s = randw(g, (N, K), -8, 7, "cuda"), (torch.rand(N, K // 128, generator=g) * 2e-2 + 5e-3).cuda()
    W = wna16.prepack_wna16(q, s, None, 4)
    cfg = W4_GLUON_CONFIGS[1]
    run = lambda x, out=None: wna16.wna16_linear_triton(  # noqa: E731
        x, W.qw, W.scales, None, None, 4, 128, N, K, config=cfg, out=out)
    first = run(torch.randn(M, K, device="cuda", dtype=torch.float16))
    assert wna16_gluon._LAUNCH.compiled and _common.fast_ready() and first.isfinite().all()
    x, out = _w4_direct_launch_and_graph(run, M, N, K, monkeypatch)
    assert rel_err(run(x), wna16.wna16_gemm_ref(x, q, W.scales.t().float(), None)) <= 5e-3


def _w4_direct_launch_and_graph(run, M, N, K, monkeypatch):
    """``run(x, out)`` (a Gluon W4A16 call, launched once before) launched directly, no TMA descriptor built; a
    CUDA graph of it replayed on new input equals a plain call. Returns the last input and output."""
    from quantkit.kernels import wna16_gluon

    _forbid_descriptors(monkeypatch, wna16_gluon, "_descriptors")
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    out = poison((M, N), torch.float16, "cuda")
    run(x, out)
    assert torch.equal(out, run(x))

    def replayed(y):
        assert torch.equal(y, run(x))

    _graph_replays(lambda: run(x, out), x, out, replayed)
    return x, out


@SM90_ONLY
@pytest.mark.parametrize("M", [37, 128, 300])
@pytest.mark.parametrize("bm,split_k,stages", [(128, 1, 4), (128, 3, 4), (64, 2, 4), (256, 2, 2)],
                         ids=["128-sk1", "128-sk3", "64-sk2", "256-sk2"])
def test_gluon_w4a16_warp_specialized_is_the_register_operand_result(layer, M, bm, split_k, stages, monkeypatch):
    """The warp-specialized register-operand kernel (a loader warp, two MMA warpgroups of 64 weight rows each) gives
    bit for bit the 8-warp register-operand kernel's result on the same tile (the same wgmmas on the same rows, the
    same split-K sums), with and without zero points and bias, fp16 and bf16, split-K counters reset (a second
    call is equal); then directly launched (no descriptors built) and in CUDA-graph replay."""
    from quantkit.kernels import wna16_gluon

    if layer["N"] * layer["K"] > 6144 * 4096:
        pytest.skip("keep the GPU test short")
    N, K = layer["N"], layer["K"]
    ws = wna16_gluon.ws_config(bm, split_k, stages)
    rs = dict(wna16_gluon.config(bm, wna16_gluon.WS_BLOCK_N, split_k, 8, 2), RS=True)
    assert wna16_gluon.warp_specialized(ws) and not wna16_gluon.warp_specialized(rs)
    for name, W, q_, z_ in [("w4", layer["Wi4"], layer["q4"], None), ("w4z", layer["Wi4z"], layer["q4"], layer["z4"])]:
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            for b in (None, torch.randn(N, device="cuda", dtype=dtype) * 0.1):
                run = lambda cfg, out=None: wna16.wna16_linear_triton(  # noqa: E731
                    x, W.qw, W.scales, W.zeros, b, 4, W.group_size, N, K, config=cfg, out=out)
                y = run(ws, poison((M, N), dtype, "cuda"))
                assert torch.equal(y, run(rs)), (name, dtype, b is not None)
                assert torch.equal(run(ws), y), (name, dtype)
                assert rel_err(y, wna16.wna16_gemm_ref(x, q_, W.scales.t().float(), z_, b)) <= 5e-3
    W = layer["Wi4"]
    run = lambda x, out=None: wna16.wna16_linear_triton(  # noqa: E731
        x, W.qw, W.scales, None, None, 4, W.group_size, N, K, config=ws, out=out)
    run(torch.randn(M, K, device="cuda", dtype=torch.float16))
    _w4_direct_launch_and_graph(run, M, N, K, monkeypatch)


GEMV_TILES = [(128, 1, 4, 8), (128, 2, 4, 4), (256, 4, 4, 6), (256, 8, 8, 6)]  # BLOCK_N, SPLIT_K, warps, ring


@SM90_ONLY
@pytest.mark.parametrize("bn,split_k,warps,ring", GEMV_TILES, ids=lambda v: str(v))
def test_gluon_w4a16_gemv_is_the_h2_gemv_result(layer, bn, split_k, warps, ring, monkeypatch):
    """The TMA-fed decode GEMV (``TMA_RING``: a loader warp streams the words, scales, zero points and packed x
    through the ring, the other warps multiply) computes the h2 GEMV's half2 products on the same packed x and sums
    them in its PER_BLOCK order, so it matches that kernel on the same tile and split (symmetric and asymmetric,
    with and without PDL, activations with an outlier so the prescale is in play, K tails and splits with no
    block: N1000_K1152 at split 8); a second call is equal (split-K counters reset); bf16 with bias; then launched
    directly (no descriptors built) and in CUDA-graph replay on new input."""
    from quantkit.kernels import wna16_gluon

    N, K = layer["N"], layer["K"]
    for W, z in ((layer["Wi4"], None), (layer["Wi4z"], layer["z4"])):
        for pdl, chain in ((False, False), (True, False), (True, True)):
            cfg = wna16._gemv_tma(bn, split_k, warps, ring, pdl=pdl, chain=chain)
            h2 = {k: v for k, v in cfg.items() if k != "TMA_RING"}
            # (N1000 with zero points: group rows at 1000-byte steps, no TMA box can start there: the h2 GEMV runs)
            tma = wna16_gluon.gemv_rows_aligned(N, z is not None)
            assert (wna16_gluon.gemv_plan(cfg, N, torch.float16, z is not None, False, pdl) is not None) == tma
            x = torch.randn(1, K, device="cuda", dtype=torch.float16) * 3.0
            x[0, K // 3] = 3000.0
            run = lambda c: wna16.wna16_linear_triton(  # noqa: E731
                x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K, config=c, out=poison((1, N), x.dtype, "cuda"))
            assert wna16_gluon.gemv_runs_on(x, W.qw, W.scales, W.zeros)  # (else the call runs the h2 kernel)
            y = run(cfg)
            assert rel_err(y, run(h2)) <= 1e-3, (pdl, z is None)
            assert rel_err(y, wna16.wna16_gemm_ref(x, layer["q4"], layer["s4"], z)) <= 1e-2, (pdl, z is None)
            assert torch.equal(run(cfg), y), (pdl, z is None)
    W = layer["Wi4z"]
    cfg = wna16._gemv_tma(bn, split_k, warps, ring)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    run = lambda c: wna16.wna16_linear_triton(  # noqa: E731
        x, W.qw, W.scales, W.zeros, b, 4, W.group_size, N, K, config=c, out=poison((1, N), x.dtype, "cuda"))
    y = run(cfg)
    assert rel_err(y, run({k: v for k, v in cfg.items() if k != "TMA_RING"})) <= 1e-3
    assert rel_err(y, wna16.wna16_gemm_ref(x, layer["q4"], layer["s4"], layer["z4"], b)) <= 1e-2

    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    out = poison((1, N), torch.float16, "cuda")
    call = lambda: wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K,  # noqa: E731
                                             config=cfg, out=out)
    call()  # (launched above with these argument types: a cached launch from here on)
    _forbid_descriptors(monkeypatch, wna16_gluon, "_gemv_descriptors")
    ref = out.clone()
    assert torch.equal(call(), ref)

    def replayed(y):
        assert torch.equal(call(), y)
        assert rel_err(y, wna16.wna16_gemm_ref(x, layer["q4"], layer["s4"], layer["z4"])) <= 1e-2

    _graph_replays(call, x, out, replayed)


@SM90_ONLY
@pytest.mark.parametrize("bn,split_k,warps,ring", [(128, 8, 4, 6), (256, 1, 4, 6)], ids=lambda v: str(v))
def test_gluon_w4a16_gemv_pdl_chain_reads_the_previous_calls_output(bn, split_k, warps, ring):
    """``PDL_CHAIN``: each GEMV lets the next launch start at once, the next call's packing (launched
    programmatically) waits on the GPU for it, and the next GEMV asks for its weights before the packing ends. A
    chain of calls, each one's input the previous one's output (N = K, split-K buffers shared), eager and replayed
    from a CUDA graph with every output poisoned before the replay, is bit for bit the chain of plain PDL calls: a
    packing that read its input too early, or a GEMV that reused the split-K buffers too early, would not be."""
    N = K = 2048
    q = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
    s_ = torch.rand((N, K // 128), device="cuda") * 0.002 + 0.004  # ~1 / (sqrt(K) std(q)): |y| stays near |x|
    W = wna16.prepack_wna16(q, s_, None, 4)
    plain, chain = (wna16._gemv_tma(bn, split_k, warps, ring, chain=c) for c in (False, True))
    assert _common.pdl_chains(chain, True) and not _common.pdl_chains(plain, True)
    x0 = torch.randn(1, K, device="cuda", dtype=torch.float16)
    call = lambda x, cfg, y: wna16.wna16_linear_triton(  # noqa: E731
        x, W.qw, W.scales, None, None, 4, W.group_size, N, K, config=cfg, out=y)
    want = chained_calls_match(call, x0, plain, chain)
    assert rel_err(want[0], wna16.wna16_gemm_ref(x0, q, s_.half().float(), None)) <= 1e-2


@SM90_ONLY
@pytest.mark.parametrize("per_block,unroll,split_k,slice_pre", [(True, 8, 4, True), (False, 4, 4, False)],
                         ids=["per_block-slice", "3d"])
def test_h2_gemv_pdl_chain_in_place_reads_the_previous_calls_output(per_block, unroll, split_k, slice_pre):
    """The one-launch half2 GEMV (x read in place, no packing launch) launched programmatically (``PDL``: weights
    asked of L2, then the wait, then x) and with ``PDL_CHAIN`` (it lets the next call's GEMV start at once): chains of
    calls fed by each other's outputs, eager and from a CUDA graph, bit for bit the plain one-launch GEMV's."""
    N = K = 2048
    q = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
    s_ = torch.rand((N, K // 128), device="cuda") * 0.002 + 0.004
    W = wna16.prepack_wna16(q, s_, None, 4)
    plain = wna16._gemv_h2(64, split_k, unroll, 4, per_block=per_block, slice_prescale=slice_pre)
    x0 = torch.randn(1, K, device="cuda", dtype=torch.float16)
    call = lambda x, cfg, y: wna16.wna16_linear_triton(  # noqa: E731
        x, W.qw, W.scales, None, None, 4, W.group_size, N, K, config=cfg, out=y)
    for twin in (dict(plain, PDL=True, PREFETCH=2), dict(plain, PDL=True, PDL_CHAIN=True)):
        want = chained_calls_match(call, x0, plain, twin)
    assert rel_err(want[0], wna16.wna16_gemm_ref(x0, q, s_.half().float(), None)) <= 1e-2


def _graph_replays(call, x, out, expect):
    """``call()`` (compiled before; it writes ``out``) captured in a CUDA graph and replayed three times on new
    values of its input ``x``: ``expect`` checks a copy of ``out`` after each replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        expect(out.clone())


ONCE_CONFIGS = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, SPLIT_K=1, num_warps=4, num_stages=3),
                dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, SPLIT_K=4, num_warps=4, num_stages=4),
                dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, GROUP_M=1, SPLIT_K=1, num_warps=4, num_stages=2)]


@pytest.mark.parametrize("M", [1, 5, 16, 64])
@pytest.mark.parametrize("cfg", ONCE_CONFIGS, ids=["16x32x256", "16x64x256-sk4", "64x128x256"])
def test_w8a8_quant_once_on_gpu(layer, M, cfg):
    """QUANT_ONCE with its real concurrency (K-chunk programs quantizing x into the scratch, the rest spinning): bit for bit the
    two-launch path over repeated calls (bias on/off, fp16/bf16, mixed rows), counters back at zero, and a
    CUDA graph of it replayed on new inputs."""
    N, K, W = layer["N"], layer["K"], layer["W8"]
    once = dict(cfg, QUANT_ONCE=True)
    for dtype in (torch.float16, torch.bfloat16):
        for b in (None, torch.randn(N, device="cuda", dtype=dtype)):
            for _ in range(3):
                x = torch.randn(M, K, device="cuda", dtype=dtype) * 4
                ref = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=cfg)
                y = w8a8.w8a8_linear_triton(x, W.w, W.scale, b, config=once, out=poison((M, N), dtype, "cuda"))
                assert torch.equal(y, ref)
    assert w8a8.once_counters(torch.device("cuda"))[:4].tolist() == [0, 0, 0, 0]
    assert not w8a8._once_maxima(x.device, x.shape[0]).any()
    assert rel_err(y, w8a8.w8a8_gemm_ref(x, W.w, W.scale, b)) <= 1e-2
    rb = (torch.rand(M, device="cuda") < 0.5).to(torch.uint8)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    ref = mixed.mixed_linear_triton(x, W.w, W.scale, layer["w16"], mixed.CTRL_ROW_BITS, rb, None, config=cfg)
    y = mixed.mixed_linear_triton(x, W.w, W.scale, layer["w16"], mixed.CTRL_ROW_BITS, rb, None, config=once)
    assert torch.equal(y, ref)
    _graph_replays_match(W, x, once, cfg)


def test_graph_survives_kernel_buffers_growing(layer):
    """A CUDA graph captured with the split-K workspace and counters of a decode-sized call replays right after a
    larger eager call grew (replaced) those buffers and the freed-looking memory was handed out again."""
    N, K, W = layer["N"], layer["K"], layer["W8"]
    small = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, num_warps=4, num_stages=3)
    x = torch.randn(4, K, device="cuda", dtype=torch.float16)
    out = poison((4, N), torch.float16, "cuda")
    w8a8.w8a8_linear_triton(x, W.w, W.scale, config=small, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w8a8.w8a8_linear_triton(x, W.w, W.scale, config=small, out=out)
    big = dict(small, BLOCK_N=32, SPLIT_K=8)  # more tiles x splits: the workspace and counters grow
    xb = torch.randn(512, K, device="cuda", dtype=torch.float16)
    w8a8.w8a8_linear_triton(xb, W.w, W.scale, config=big)
    junk = [torch.full((1 << 20,), -7, device="cuda", dtype=torch.int32) for _ in range(8)]  # take freed memory
    for _ in range(3):
        x.copy_(torch.randn(4, K, device="cuda", dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, w8a8.w8a8_linear_triton(x, W.w, W.scale, config=small))
    assert all(bool((j == -7).all()) for j in junk)  # and the replays wrote nothing of anyone else's


@pytest.mark.parametrize("M", [1, 256, 2048])
def test_public_ops_bf16(layer, M):
    if layer["N"] * layer["K"] > 6144 * 4096:
        pytest.skip("keep the GPU test short")
    x = torch.randn(M, layer["K"], device="cuda", dtype=torch.bfloat16)
    W = layer["Wi4z"]
    assert rel_err(wna16.wna16_linear(x, W), wna16.wna16_gemm_ref(x, layer["q4"], layer["s4"], layer["z4"])) <= 1e-2
    assert rel_err(w8a8.w8a8_linear(x, layer["W8"]), w8a8.w8a8_gemm_ref(x, layer["W8"].w, layer["W8"].scale)) <= 1e-2


@pytest.mark.parametrize("M", [1, 3, 16])
def test_w8a8_dp4a_gemv_and_mixed(layer, M):
    """dp4a GEMV (activations quantized once per call) for M <= 16, and mixed mode inside it."""
    N, K = layer["N"], layer["K"]
    W = layer["W8"]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    ref = w8a8.w8a8_gemm_ref(x, W.w, W.scale)
    cfgs = [dict(BACKEND="gemv", BLOCK_N=16, BLOCK_K=64, SPLIT_K=8, num_warps=4, num_stages=2)]
    if M <= 4:  # BLOCK_M x BLOCK_N x BLOCK_K/4 int32 partials must fit in registers
        cfgs.append(dict(BACKEND="gemv", BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, num_warps=8, num_stages=2))
        cfgs.append(dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=512, SPLIT_K=4, num_warps=4, num_stages=2, LOAD_STAGES=4))
        cfgs.append(dict(BACKEND="gemv", BLOCK_N=2, BLOCK_K=1024, SPLIT_K=1, num_warps=4, num_stages=2))  # row tiles
    for cfg in cfgs:
        y = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=poison((M, N), torch.float16, "cuda"))
        assert rel_err(y, ref) <= 2e-3, cfg
        for fuse in (False, True):  # the cp.async ring moves loads, not arithmetic: the same bits
            c = dict(cfg, FUSE_QUANT=fuse)
            y1 = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=c, out=poison((M, N), torch.float16, "cuda"))
            y3 = w8a8.w8a8_linear_triton(x, W.w, W.scale, config=dict(c, LOAD_STAGES=3),
                                         out=poison((M, N), torch.float16, "cuda"))
            assert torch.equal(y1, y3), c
        rb = (torch.arange(M, device="cuda") % 2 == 0).to(torch.uint8)
        for wf in (layer["w16"], None):
            y = mixed.mixed_linear_triton(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb, config=cfg,
                                          out=poison((M, N), torch.float16, "cuda"))
            refm = mixed.mixed_gemm_ref(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb)
            assert rel_err(y, refm) <= 1e-2, (cfg, wf is None)


def test_wna16_gemv_h2_per_block(layer):
    """The h2 GEMV's PER_BLOCK loop (2-D tiles: fewer registers per thread) with the half2 asm on the
    real shapes: near the 3-D loop (same products, other summation order) and the exact reference."""
    N, K = layer["N"], layer["K"]
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    for W, z in ((layer["Wi4"], None), (layer["Wi4z"], layer["z4"])):
        ref = wna16.wna16_gemm_ref(x, layer["q4"], layer["s4"], z)
        for bn, sk, u, w in ((64, 4, 8, 4), (128, 4, 2, 4), (128, 2, 4, 4), (64, 2, 4, 4)):
            y3, y2, y2s = [wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K,
                                                     config=wna16._gemv_h2(bn, sk, u, w, per_block=pb, load_stages=ls),
                                                     out=poison((1, N), torch.float16, "cuda"))
                           for pb, ls in ((False, 1), (True, 1), (True, 4))]
            assert rel_err(y2, y3) <= 2e-3 and rel_err(y2, ref) <= 1e-2, (bn, sk, u, w, z is None)
            assert torch.equal(y2s, y2), (bn, sk, u, w)  # the cp.async ring moves loads, not arithmetic
            ysl = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K,
                                            config=wna16._gemv_h2(bn, sk, u, w, per_block=True, slice_prescale=True),
                                            out=poison((1, N), torch.float16, "cuda"))
            assert rel_err(ysl, y2) <= 2e-3 and rel_err(ysl, ref) <= 1e-2, (bn, sk, u, w)  # each split's own prescale


def test_wna16_gemv_h2_packed_x_is_the_in_loop_result(layer):
    """PACKED_X (x prescaled and packed into half2 pairs by a launch of its own, the GEMV launched after it, with
    PDL programmatically, with PREFETCH asking L2 for its first weights before it waits): the same fp16 pairs and
    products as the in-loop form, so bit for bit its output, 3-D and PER_BLOCK tiles, symmetric and asymmetric,
    fp16 and bf16 activations with outliers; each call on new activations (a read before the PDL wait would see
    the previous call's), and in a CUDA graph replayed on new input."""
    N, K = layer["N"], layer["K"]
    for W in (layer["Wi4"], layer["Wi4z"]):
        for bn, sk, u, w, pb in ((128, 2, 4, 4, False), (64, 4, 4, 4, False), (64, 2, 8, 4, True)):
            plain = wna16._gemv_h2(bn, sk, u, w, per_block=pb)
            for pdl, prefetch in ((False, 0), (True, 0), (True, 2)):
                packed = dict(wna16._gemv_h2(bn, sk, u, w, per_block=pb, packed_x=True, pdl=pdl), PREFETCH=prefetch)
                for dtype in (torch.float16, torch.bfloat16):
                    for scale in (1.0, 40.0):
                        x = torch.randn(1, K, device="cuda", dtype=dtype) * scale
                        x[0, K // 3] = 3000.0  # the prescale in play
                        run = lambda cfg: wna16.wna16_linear_triton(  # noqa: E731
                            x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K, config=cfg,
                            out=poison((1, N), dtype, "cuda"))
                        assert torch.equal(run(packed), run(plain)), (bn, sk, u, w, pb, pdl, prefetch, dtype, scale)
    cfg = dict(wna16._gemv_h2(128, 2, 4, 4, packed_x=True, pdl=True), PREFETCH=2)
    W = layer["Wi4z"]
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    out = torch.empty(1, N, device="cuda", dtype=torch.float16)
    call = lambda: wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K,  # noqa: E731
                                             config=cfg, out=out)
    call()  # compiled before the capture

    def replayed(y):  # the in-loop GEMV's result on the new input
        assert torch.equal(y, wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K,
                                                        config=wna16._gemv_h2(128, 2, 4, 4)))

    _graph_replays(call, x, out, replayed)


@pytest.mark.parametrize("M", [1, 16, 256])
def test_lean_launch_matches_the_launcher(layer, M):
    """Every shipped kernel at this shape and M gives the same bits with the lean launch (each cached kernel's C
    launch called directly, CUDA tensors passed as addresses: ``_common.LEAN_LAUNCH``) as through Triton's launcher,
    and on Triton 3.6 the cached launches do take it."""
    N, K, W8 = layer["N"], layer["K"], layer["W8"]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    rb = (torch.rand(M, device="cuda") < 0.5).to(torch.uint8)
    calls = [lambda W=W: wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, W.bits, W.group_size, N, K)
             for W in (layer["Wi4"], layer["Wi4z"], layer["Wi8"])]
    calls += [lambda: w8a8.w8a8_linear_triton(x, W8.w, W8.scale),
              lambda: mixed.mixed_linear_triton(x, W8.w, W8.scale, layer["w16"], mixed.CTRL_ROW_BITS, rb)]
    prev = _common.set_lean_launch(True)
    try:
        for call in calls:
            call()  # compiled, cached
            lean = [call() for _ in range(2)]
            _common.set_lean_launch(False)
            plain = call()
            _common.set_lean_launch(True)
            assert all(torch.equal(y, plain) for y in lean)
    finally:
        _common.set_lean_launch(prev)
    from triton.backends.nvidia import driver

    if getattr(driver, "_BASE_ARGS_FORMAT", None) == _common.BASE_ARGS_FORMAT:
        assert any(ent[3] is not None for ent in _common._FAST.values())


@pytest.mark.parametrize("M", [1, 16, 256])
def test_replayed_calls_match_the_wrapper(layer, M, monkeypatch):
    """The public ops' replays (``_replay``: a call's recorded C launches sent again, x's and out's addresses put
    in) give the wrapper's bits on new inputs, eager and captured into a CUDA graph; the decode Ms are replayed."""
    from quantkit.kernels import _replay

    monkeypatch.setattr(_common, "CHECK_LAUNCH", False)  # (which turns replays off)
    N, K = layer["N"], layer["K"]
    ops = [(W, "wna16_linear", lambda x, W=W: wna16.wna16_linear(x, W))
           for W in (layer["Wi4"], layer["Wi4z"], layer["Wi8"])]
    ops.append((layer["W8"], "w8a8_linear", lambda x: w8a8.w8a8_linear(x, layer["W8"])))
    # mixed: row bits made from x each call (a new tensor, as the runtime's), about half the rows FP16
    ops.append((layer["W8"], "mixed_linear", lambda x: mixed.mixed_linear(
        x, layer["W8"], layer["w16"], mixed.CTRL_ROW_BITS, (x[:, 0] > 0).to(torch.uint8))))
    prev = _replay.set_replay(True)
    try:
        for W, name, op in ops:
            for _ in range(3):  # compiled, recorded, replayed
                op(torch.randn(M, K, device="cuda", dtype=torch.float16))
            for _ in range(2):
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                y = op(x)
                _replay.set_replay(False)
                assert torch.equal(y, op(x)), (M, N, K)
                _replay.set_replay(True)
            if M <= 16 and name != "mixed_linear":  # (a mixed tile whose FP16 loop builds TMA descriptors on the
                # device launches with scratch memory: no lean launch, so no replay, and the wrapper runs)
                assert any(site.replays for (_, op_name), (ref, site) in _replay._SITES.items()
                           if ref() is W and op_name == name), (name, M, N, K)
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            op(x)
            for _ in range(3):  # the capture's own kind of call: recorded in one capture, replayed in the next
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = op(x)
                x.copy_(torch.randn(M, K, device="cuda", dtype=torch.float16))
                graph.replay()
                torch.cuda.synchronize()
                _replay.set_replay(False)
                assert torch.equal(out, op(x)), (M, N, K)
                _replay.set_replay(True)
    finally:
        _replay.set_replay(prev)


def test_lean_launch_still_rejects_a_cpu_tensor():
    """A CPU tensor in a cached launch stays a tensor under the lean launch, so Triton's launcher names it."""
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    s = torch.empty(4, 1, device="cuda")
    act_quant.per_token_quant_triton(x, out_q=torch.empty(4, 256, dtype=torch.int8, device="cuda"), out_s=s)
    with pytest.raises(ValueError, match="cpu tensor"):
        act_quant.per_token_quant_triton(x, out_q=torch.empty(4, 256, dtype=torch.int8), out_s=s)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_public_fast_path_matches_custom_op(layer, dtype):
    """The eager fast path (no custom-op dispatch, cached launches) == the custom op, bitwise."""
    N, K = layer["N"], layer["K"]
    ops = torch.ops.quantkit
    for M in (1, 16, 100):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        for W in (layer["Wi4"], layer["Wi4z"], layer["Wi8"]):
            a = wna16.wna16_linear(x, W)
            a2 = wna16.wna16_linear(x, W)  # second call: cached launch
            b = ops.wna16_linear(x, W.qw, W.scales, W.zeros, None, W.bits, W.group_size, N, K)
            assert torch.equal(a, b) and torch.equal(a2, b)
        W8 = layer["W8"]
        assert torch.equal(w8a8.w8a8_linear(x, W8), ops.w8a8_linear(x, W8.w, W8.scale, None))
        rb = (torch.rand(M, device="cuda") < 0.5).to(torch.uint8)
        assert torch.equal(mixed.mixed_linear(x, W8, layer["w16"].to(dtype), mixed.CTRL_ROW_BITS, rb),
                           ops.mixed_linear(x, W8.w, W8.scale, layer["w16"].to(dtype), mixed.CTRL_ROW_BITS, rb, None))

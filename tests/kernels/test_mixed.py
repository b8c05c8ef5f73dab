import pytest
import torch

from _kernel_util import poison, randw, rel_err
from quantkit.kernels import mixed, w8a8

CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


def _layer(dev, seed, M, N, K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).half().to(dev)
    q = randw(g, (N, K), -127, 127, dev)
    s = (torch.rand(N, 1, generator=g) * 0.01 + 1e-3).to(dev)
    W = w8a8.prepack_w8a8(q, s)
    w16 = (torch.randn(N, K, generator=g) * 0.3).half().to(dev)  # independent: wrong path => large error
    bias = torch.randn(N, generator=g).to(dev)
    return x, W, w16, bias


def _rows_err(y, ref, rows):
    return rel_err(y[rows], ref[rows]) if rows.any() else 0.0


def _check_mixed(y, x, W, wf, rb, bias):
    """FP16 rows fp16-accurate and INT8 rows at the W8A8 reference's accuracy, each set failing the other path's
    reference (so a call that ran the wrong path on a row set cannot pass)."""
    ref = mixed.mixed_gemm_ref(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb, bias)
    fp = rb.bool()
    assert _rows_err(y, ref, fp) <= 2e-3
    assert _rows_err(y, ref, ~fp) <= 1e-2
    ref_i8 = w8a8.w8a8_gemm_ref(x, W.w, W.scale, bias)
    if fp.any():
        assert _rows_err(y, ref_i8, fp) > 2e-3
    return fp


@pytest.mark.parametrize("M,N,K", [(3, 40, 96), (37, 50, 64)])
@pytest.mark.parametrize("fp16_copy", [True, False])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("pattern", ["random", "none", "all", "blocks"])
def test_mixed_rows(dev, M, N, K, fp16_copy, fuse, pattern):
    x, W, w16, bias = _layer(dev, M + N + K, M, N, K)
    g = torch.Generator().manual_seed(M)
    if pattern == "random":
        rb = (torch.rand(M, generator=g) < 0.5).to(torch.uint8)
    elif pattern == "none":
        rb = torch.zeros(M, dtype=torch.uint8)
    elif pattern == "all":
        rb = torch.ones(M, dtype=torch.uint8)
    else:  # uniform 16-row tiles + one straddling tile
        rb = ((torch.arange(M) // 16) % 2 == 0).to(torch.uint8)
        rb[min(M - 1, 20)] ^= 1
    rb = rb.to(dev)
    wf = w16 if fp16_copy else None
    out = poison((M, N), torch.float16, dev)
    y = mixed.mixed_linear_triton(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb, bias,
                                  config=dict(CFG, FUSE_QUANT=fuse), out=out)
    _check_mixed(y, x, W, wf, rb, bias)


@pytest.mark.parametrize("fp16_copy", [True, False])
def test_control_word(dev, fp16_copy):
    M, N, K = 5, 40, 64
    x, W, w16, bias = _layer(dev, 11, M, N, K)
    wf = w16 if fp16_copy else None
    rb = torch.tensor([1, 0, 1, 0, 0], dtype=torch.uint8, device=dev)
    for ctrl in (0, mixed.CTRL_FORCE_FP16, mixed.CTRL_ROW_BITS, mixed.CTRL_FORCE_FP16 | mixed.CTRL_ROW_BITS):
        out = poison((M, N), torch.float16, dev)
        y = mixed.mixed_linear_triton(x, W.w, W.scale, wf, ctrl, rb, bias, config=dict(CFG, FUSE_QUANT=True), out=out)
        ref = mixed.mixed_gemm_ref(x, W.w, W.scale, wf, ctrl, rb, bias)
        assert rel_err(y, ref) <= 2e-3, ctrl
    y = mixed.mixed_linear(x, W, wf, mixed.CTRL_ROW_BITS, rb, bias)  # public custom op
    assert rel_err(y, mixed.mixed_gemm_ref(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb, bias)) <= 2e-3
    with pytest.raises(ValueError):
        mixed.mixed_linear(x, W, wf, 1 << 5, rb)
    with pytest.raises(ValueError):
        mixed.mixed_linear(x, W, wf, mixed.CTRL_ROW_BITS, None)


def test_row_precision_bits():
    sample_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    pos = torch.tensor([0, 63, 64, 0, 130, 5, 200])
    sample_bits = torch.tensor([0, 0, 1], dtype=torch.uint8)
    group_bits = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.uint8)
    rb = mixed.row_precision_bits(sample_ids, pos, sample_bits, group_bits)
    assert rb.dtype == torch.uint8
    assert rb.tolist() == [0, 0, 1, 1, 0, 1, 1]
    assert mixed.row_precision_bits(sample_ids, pos, None, None).sum() == 0


GEMV = dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)


@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (3, 40, 100), (16, 36, 64)])
@pytest.mark.parametrize("cfg", [dict(GEMV, SPLIT_K=1), dict(GEMV, SPLIT_K=3), dict(CFG, FUSE_QUANT=False, SPLIT_K=2),
                                 dict(CFG, FUSE_QUANT=True, SPLIT_K=3), dict(CFG, FUSE_QUANT=False, TMA_F=True),
                                 dict(CFG, FUSE_QUANT=False, SPLIT_K=2, TMA_F=True)],
                         ids=["gemv", "gemv-sk3", "mma-sk2", "mma-fuse-sk3", "mma-tmaf", "mma-tmaf-sk2"])
@pytest.mark.parametrize("fp16_copy", [True, False])
@pytest.mark.parametrize("pattern", ["random", "none", "all"])
def test_mixed_rows_w8a8_paths(dev, M, N, K, cfg, fp16_copy, pattern):
    """Mixed mode runs inside the plain W8A8 kernels (GEMV and split-K tensor-core paths; TMA_F: the FP16 loop
    through tensor descriptors, where x and the weight are aligned for them)."""
    if cfg.get("TMA_F") and dev.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need Hopper or newer")
    x, W, w16, bias = _layer(dev, 3 * M + N + K, M, N, K)
    g = torch.Generator().manual_seed(M + 1)
    rb = {"random": (torch.rand(M, generator=g) < 0.5), "none": torch.zeros(M, dtype=torch.bool),
          "all": torch.ones(M, dtype=torch.bool)}[pattern]
    if pattern == "random" and M > 1:
        rb[0], rb[1] = True, False
    rb = rb.to(torch.uint8).to(dev)
    wf = w16 if fp16_copy else None
    if cfg.get("TMA_F"):  # x rows of 2K bytes, int8 weight rows of K: descriptors need 16-byte row strides
        assert w8a8._fp16_loop_tma(cfg, x, W.w if wf is None else wf) == ((K * (2 if fp16_copy else 1)) % 16 == 0)
    y = mixed.mixed_linear_triton(x, W.w, W.scale, wf, mixed.CTRL_ROW_BITS, rb, bias, config=cfg,
                                  out=poison((M, N), torch.float16, dev))
    fp = _check_mixed(y, x, W, wf, rb, bias)
    if (~fp).any() and fp16_copy:
        ref_f = mixed.mixed_gemm_ref(x, W.w, W.scale, wf, mixed.CTRL_FORCE_FP16, rb, bias)
        assert _rows_err(y, ref_f, ~fp) > 1e-2


@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (3, 40, 100), (16, 36, 64), (37, 50, 64)])
@pytest.mark.parametrize("cfg", [dict(GEMV, SPLIT_K=1), dict(GEMV, SPLIT_K=3), dict(CFG, FUSE_QUANT=False, SPLIT_K=2),
                                 dict(CFG, FUSE_QUANT=True, SPLIT_K=3), dict(CFG, FUSE_QUANT=False, SPLIT_K=1),
                                 dict(CFG, FUSE_QUANT=False, TMA_F=True), dict(CFG, FUSE_QUANT=False, SPLIT_K=2, TMA_F=True)],
                         ids=["gemv", "gemv-sk3", "mma-sk2", "mma-fuse-sk3", "mma", "mma-tmaf", "mma-tmaf-sk2"])
@pytest.mark.parametrize("fp16_copy", [True, False])
def test_int8_rows_bit_identical_to_plain_w8a8(dev, M, N, K, cfg, fp16_copy):
    """Switching some rows (samples) to FP16 leaves every INT8 row's output bit-identical to the
    plain W8A8 call: split-K partials of INT8 rows stay exact int32 in mixed mode. float32
    activations and outputs, so a float32 rounding difference cannot hide in an fp16 output."""
    if cfg.get("BACKEND") == "gemv" and M > 16:
        pytest.skip("the GEMV path takes M <= 16")
    if cfg.get("TMA_F") and dev.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need Hopper or newer")
    x, W, w16, bias = _layer(dev, 7 * M + N + K, M, N, K)
    x, w16 = x.float() * 3.7, w16.float()
    plain = w8a8.w8a8_linear_triton(x, W.w, W.scale, bias, config=cfg, out=poison((M, N), torch.float32, dev))
    g = torch.Generator().manual_seed(M + 5)
    rb = (torch.rand(M, generator=g) < 0.4).to(torch.uint8)
    rb[0] = 1  # at least one FP16 row
    rb = rb.to(dev)
    y = mixed.mixed_linear_triton(x, W.w, W.scale, w16 if fp16_copy else None, mixed.CTRL_ROW_BITS, rb, bias,
                                  config=cfg, out=poison((M, N), torch.float32, dev))
    i8 = ~rb.bool()
    assert torch.equal(y[i8], plain[i8])
    assert not torch.equal(y[rb.bool()], plain[rb.bool()])  # the FP16 rows did change


TMA = dict(BACKEND="tma", BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


@pytest.mark.parametrize("M,N,K", [(40, 48, 64), (33, 24, 96)])  # ragged M and N: the descriptors clip
@pytest.mark.parametrize("fp16_copy", [True, False])
@pytest.mark.parametrize("pattern", ["random", "none", "all", "blocks"])
def test_mixed_rows_on_the_persistent_tma_kernel(dev, M, N, K, fp16_copy, pattern):
    """The large-M W8A8 path (persistent grid, TMA descriptors) takes the row bits too, so a batch with a few
    FP16 requests keeps it: FP16 rows match the FP16 reference, INT8 rows are bit for bit the plain TMA call's
    (float32 activations: a rounding difference cannot hide in an fp16 output)."""
    if dev.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need Hopper or newer")
    x, W, w16, bias = _layer(dev, 5 * M + N + K, M, N, K)
    g = torch.Generator().manual_seed(M + 11)
    rb = {"random": torch.rand(M, generator=g) < 0.4, "none": torch.zeros(M, dtype=torch.bool),
          "all": torch.ones(M, dtype=torch.bool), "blocks": (torch.arange(M) // 16) % 2 == 1}[pattern]
    if pattern == "blocks":
        rb[3] = True  # one tile straddles
    rb = rb.to(torch.uint8).to(dev)
    wf = w16 if fp16_copy else None
    for dtype in (torch.float16, torch.float32):
        xd, wfd = x.to(dtype) * 3.1, None if wf is None else wf.to(dtype)
        out = poison((M, N), dtype, dev)
        assert w8a8.tma_applies(xd, W.w, out, rb, wfd)
        y = mixed.mixed_linear_triton(xd, W.w, W.scale, wfd, mixed.CTRL_ROW_BITS, rb, bias, config=TMA, out=out)
        plain = w8a8.w8a8_linear_triton(xd, W.w, W.scale, bias, config=TMA)
        ref = mixed.mixed_gemm_ref(xd, W.w, W.scale, wfd, mixed.CTRL_ROW_BITS, rb, bias)
        fp = rb.bool()
        assert torch.equal(y[~fp], plain[~fp])
        assert _rows_err(y, ref, fp) <= 2e-3
        if fp.any():
            assert _rows_err(y, plain, fp) > 2e-3  # the FP16 rows did change
        if fp16_copy and (~fp).any():
            ref_f = mixed.mixed_gemm_ref(xd, W.w, W.scale, wfd, mixed.CTRL_FORCE_FP16, rb, bias)
            assert _rows_err(y, ref_f, ~fp) > 1e-2


def _plan_consts(cfg, row_bits, tma_f=False):
    """The constexprs and launch options of the tl.dot kernel's plan at M=256, N=K=4096 (FP16 copy when mixed)."""
    # _launch_plan's flags: bias, row bits, FP16 copy, FUSE_QUANT, int32 out, QUANT_ONCE, TMA_F, interp, PDL
    flags = (False, row_bits, row_bits, False, False, False, tma_f, False, False)
    return w8a8._launch_plan(cfg, 256, 4096, 4096, torch.device("cpu"), flags)[6]


@pytest.mark.parametrize("cfg,cap", [
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3), 128),  # two CTAs per SM: kept
    (dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3), None),  # one CTA per SM anyway
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3), None),  # accumulator of 128 registers
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4), None),  # 4 warps: two CTAs below 255
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, MAXNREG=0), None),  # a config decides
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4, MAXNREG=168), 168),
])
def test_mixed_register_cap(cfg, cap):
    """The register cap mixed mode launches with (w8a8._mixed_maxnreg): only where the plain kernel runs two
    8-warp CTAs per SM and the cap can build; a config's MAXNREG overrides it. The launch plan passes it to
    Triton, and the plain kernel's plan never carries one."""
    assert w8a8._mixed_maxnreg(cfg) == cap
    full = dict(cfg, GROUP_M=8)
    assert _plan_consts(full, row_bits=True)["maxnreg"] == cap
    assert _plan_consts(full, row_bits=False)["maxnreg"] is None


@pytest.mark.parametrize("cfg,depth", [
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_stages=3), 3),  # BLOCK_KF 64: measured right at depth 3
    (dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, num_stages=3), 3),
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, num_stages=3), 2),  # depth 3 wrote wrong FP16 rows (H100)
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_stages=3, BLOCK_KF=128), 2),
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_stages=3), 2),
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_stages=3, STAGES_F=1), 1),
])
def test_descriptor_fed_fp16_loop_depth(cfg, depth):
    """FP16 loops fed by tensor descriptors run at most 2 deep outside the case measured right at 3
    (w8a8._desc_stages_f); the persistent kernel's launch and the tl.dot kernel's TMA_F plan both use it."""
    assert w8a8._desc_stages_f(cfg) == depth
    assert _plan_consts(dict(cfg, GROUP_M=8, num_warps=8), row_bits=True, tma_f=True)["STAGES_F"] == depth

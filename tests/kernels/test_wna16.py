import json
import pathlib

import pytest
import torch

from _kernel_util import poison, randw, rel_err
from quantkit.kernels import wna16

CFG = dict(BACKEND="triton", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=1)


def _make(dev, seed, N, K, bits, gs, asym):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = randw(g, (N, K), lo, hi, dev)
    s = (torch.rand(N, K // gs, generator=g) * 0.02 + 1e-3).to(dev)
    z = randw(g, (N, K // gs), lo, hi, dev) if asym else None
    return q, s, z


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,N,K,gs,asym,bk,split_k", [
    (1, 40, 256, 128, False, 128, 1),
    (3, 70, 160, 32, True, 128, 2),   # K % 128 != 0, odd N
    (17, 48, 96, 96, True, 128, 1),   # per-channel, K < 128
    (2, 50, 512, 256, False, 256, 3),  # group 256, BLOCK_K 256, uneven split
    (5, 40, 320, 64, True, 256, 1),
])
def test_wna16_linear(dev, bits, M, N, K, gs, asym, bk, split_k):
    q, s, z = _make(dev, M + N + K + bits, N, K, bits, gs, asym)
    g = torch.Generator().manual_seed(K)
    x = torch.randn(M, K, generator=g).half().to(dev)
    bias = torch.randn(N, generator=g).to(dev)
    W = wna16.prepack_wna16(q, s, z, bits)
    out = poison((M, N), torch.float16, dev)
    y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, bias, bits, W.group_size, N, K,
                                  config=dict(CFG, BLOCK_K=bk, SPLIT_K=split_k), out=out)
    ref = wna16.wna16_gemm_ref(x, q, s, z, bias)
    assert rel_err(y, ref) <= 1e-2
    if z is not None:  # the tolerance can fail: ignoring the zeros is far off
        assert rel_err(y, wna16.wna16_gemm_ref(x, q, s, None, bias)) > 1e-2


@pytest.mark.parametrize("bits,asym", [(4, False), (4, True), (8, True)])
def test_prepack_roundtrip_and_dequant(dev, bits, asym):
    N, K, gs = 40, 160, 32
    q, s, z = _make(dev, 3, N, K, bits, gs, asym)
    W = wna16.prepack_wna16(q, s, z, bits)
    q2, s2, z2 = wna16._unpack_ref(W.qw, W.scales, W.zeros, bits, W.group_size, N, K)
    assert torch.equal(q2, q)
    assert z is None or torch.equal(z2, z)
    out = wna16.wna16_dequant(W.qw, W.scales, W.zeros, bits, gs, N, K)
    assert rel_err(out.t(), wna16.dequant_ref(q, s, z)) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_public_op_and_fake(dev, dtype):
    if dtype == torch.bfloat16 and dev.type == "cpu":
        pytest.skip("Triton's interpreter computes bf16 tl.dot on raw bits (interpreter bug); GPU only")
    N, K = 48, 256
    q, s, z = _make(dev, 9, N, K, 4, 128, True)
    W = wna16.prepack_wna16(q, s, z, 4)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(2)).to(dtype).to(dev)
    y = wna16.wna16_linear(x, W)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    assert rel_err(y.reshape(6, N), wna16.wna16_gemm_ref(x.reshape(6, K), q, s, z)) <= 1e-2
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        f = torch.ops.quantkit.wna16_linear(torch.empty(5, K, dtype=torch.float16), torch.empty(K // 8, N, dtype=torch.int32),
                                            torch.empty(2, N, dtype=torch.float16), None, None, 4, 128, N, K)
    assert f.shape == (5, N)


def test_unsupported_group_size():
    with pytest.raises(ValueError):
        wna16.prepack_wna16(torch.ones(4, 96, dtype=torch.int8), torch.ones(4, 2), None, 4)  # group 48


GEMV = dict(BACKEND="gemv", BLOCK_N=32, num_warps=4, num_stages=1)
MMA_SWAP = dict(BACKEND="mma", BLOCK_M=16, BLOCK_N=32, SWAP_AB=True, GROUP_M=1, num_warps=4, num_stages=1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,N,K,gs,asym,cfg,split_k", [
    (1, 40, 384, 128, False, GEMV, 3),   # GEMV, decode, uneven split-K reduction (3 blocks / 3 splits)
    (3, 70, 160, 32, True, GEMV, 2),     # GEMV, BLOCK_M=4 > M, small groups, K tail
    (2, 48, 256, 256, True, GEMV, 1),    # GEMV, per-channel asym
    (16, 40, 384, 64, True, MMA_SWAP, 2),  # swapped-operand tensor-core path, split-K
    (5, 50, 256, 128, False, MMA_SWAP, 1),
    (20, 40, 384, 128, True, dict(MMA_SWAP, SCALE_W=True), 2),  # weights scaled, MMAs chained
    (20, 40, 512, 256, False, dict(MMA_SWAP, SCALE_W=True), 1),
    (33, 40, 256, 256, True, dict(MMA_SWAP, BLOCK_M=32, SCALE_W=True), 1),  # per-channel
    (20, 40, 384, 128, True, dict(MMA_SWAP, SWAP_AB=False, SCALE_W=True), 3),
])
def test_wna16_paths(dev, bits, M, N, K, gs, asym, cfg, split_k):
    q, s, z = _make(dev, 100 + M + N + K + bits, N, K, bits, gs, asym)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + K)).half().to(dev)
    W = wna16.prepack_wna16(q, s, z, bits)
    y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, bits, W.group_size, N, K,
                                  config=dict(cfg, SPLIT_K=split_k), out=poison((M, N), torch.float16, dev))
    ref = wna16.wna16_gemm_ref(x, q, s, z)
    assert rel_err(y, ref) <= 1e-2
    assert rel_err(y, wna16.wna16_gemm_ref(x, q, s * 1.05, z)) > 1e-2  # the tolerance can fail


@pytest.mark.parametrize("M,backend", [(1, "gemv"), (4, "gemv"), (5, "mma"), (16, "mma"), (300, "dequant")])
def test_dispatch_thresholds(M, backend):
    """Heuristic dispatch on the GPU: GEMV for M <= 4, tensor cores to 256, dequant + cuBLAS above."""
    assert wna16._default_config(M, 4096, 4096)["BACKEND"] == backend
    cfg = wna16._default_config(M, 4096, 4096)
    if backend == "gemv":  # split-K fills ~4 waves of 132 SMs
        assert 4096 // cfg["BLOCK_N"] * cfg["SPLIT_K"] >= 264


MMA = dict(BACKEND="mma", BLOCK_M=16, BLOCK_N=32, SWAP_AB=False, GROUP_M=1, num_warps=4, num_stages=1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("cfg", [MMA, MMA_SWAP, dict(MMA_SWAP, SCALE_W=True)], ids=["mma", "swap", "swap-scale-w"])
def test_wna16_mma_magic16(dev, bits, dtype, asym, cfg):
    """Tensor-core path with the 16-bit magic dequant (fp16 any bits, bf16 4-bit) vs the fp32 one."""
    if dtype == torch.bfloat16 and dev.type != "cuda":
        pytest.skip("triton's interpreter computes bf16 tl.dot wrongly (checked: 16x16 bf16 dot off by 1e10)")
    M, N, K, gs = 19, 40, 384, 128
    q, s, z = _make(dev, 7 + bits + asym, N, K, bits, gs, asym)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(bits)).to(dtype).to(dev)
    W = wna16.prepack_wna16(q, s, z, bits)
    ref = wna16.wna16_gemm_ref(x, q, s, z)
    ys = []
    for magic in (True, False):
        y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, bits, gs, N, K,
                                      config=dict(cfg, SPLIT_K=2, MAGIC16=magic), out=poison((M, N), dtype, dev))
        assert rel_err(y, ref) <= 1e-2
        ys.append(y)
    assert rel_err(ys[0], ys[1]) <= 1e-2
    assert rel_err(ys[0], wna16.wna16_gemm_ref(x, q, s * 1.05, z)) > 1e-2
    if z is not None:
        assert rel_err(ys[0], wna16.wna16_gemm_ref(x, q, s, None)) > 1e-2


def test_tuned_configs_are_data(tmp_path):
    """Measured configs live in configs/<gpu>.json: the shipped H200 file is read by the caches, and
    write_tuned merges new entries into a GPU's file without dropping the others."""
    from quantkit.kernels import _common, w8a8

    assert wna16.CONFIGS.get(1, 4096, 4096, "H200")["BACKEND"] in ("gemv", "gemv_h2")
    assert wna16.CONFIGS.get(1, 4096, 4096, "SOME-NEW-GPU") == wna16._default_config(1, 4096, 4096)
    assert len(w8a8.CONFIGS.table) > 0
    _common.write_tuned("G1", "w4a16", {(1, 64, 128): {"BACKEND": "gemv", "BLOCK_N": 32}}, directory=str(tmp_path))
    _common.write_tuned("G1", "w4a16", {(16, 64, 128): {"BACKEND": "mma"}}, directory=str(tmp_path))
    _common.write_tuned("G1", "w8a8", {(1, 64, 128): {"BLOCK_N": 16}}, directory=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G1.json"]  # written aside, then renamed over
    t = _common.load_tuned("w4a16", directory=str(tmp_path))
    assert t == {("G1", 1, 64, 128): {"BACKEND": "gemv", "BLOCK_N": 32}, ("G1", 16, 64, 128): {"BACKEND": "mma"}}
    cache = _common.ConfigCache(wna16._default_config, table=t)
    assert cache.get(2, 64, 128, "G1") == {"BACKEND": "mma"}  # bucket 2: the nearest larger measured bucket
    assert cache.get(100, 64, 128, "G1") == {"BACKEND": "mma"}  # bucket 128: the largest smaller one, 8x away
    # a file measured only at large M (prefill tiles) never stands in for decode: further than 8x -> heuristic
    big = _common.ConfigCache(wna16._default_config, table={("G1", 2048, 64, 128): {"BACKEND": "dequant"}})
    assert big.get(1, 64, 128, "G1") == wna16._default_config(1, 64, 128)
    assert big.get(16, 64, 128, "G1") == wna16._default_config(16, 64, 128)
    assert big.get(256, 64, 128, "G1") == {"BACKEND": "dequant"} == big.get(8192, 64, 128, "G1")
    assert big.get(16384, 64, 128, "G1") == wna16._default_config(16384, 64, 128)


def test_a_gpu_without_tuned_configs_is_told_once(caplog, monkeypatch):
    """A GPU with no configs/<gpu>.json (an H100 today) runs the heuristics: one warning naming the file and the
    command that measures it; none for a GPU with a file, none on the CPU interpreter."""
    from quantkit.kernels import _common

    monkeypatch.setattr(_common, "_UNTUNED_WARNED", set())
    with caplog.at_level("WARNING", logger="quantkit.kernels._common"):
        for _ in range(3):
            assert wna16.CONFIGS.get(64, 4096, 4096, "SOME-NEW-GPU") == wna16._default_config(64, 4096, 4096)
        wna16.CONFIGS.get(64, 1000, 1000, "H200")  # untuned shape on a tuned GPU: its file exists, no warning
        wna16.CONFIGS.get(64, 1000, 1000, "cpu")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1, msgs
    assert "SOME-NEW-GPU" in msgs[0] and "configs/SOME-NEW-GPU.json" in msgs[0] and "gemm.py --tune" in msgs[0]


@pytest.mark.parametrize("N,K,gs,asym,unroll,split_k,bias,big", [
    (40, 384, 128, False, 2, 1, False, False),   # 3 blocks, UNROLL 2: a masked half step
    (70, 512, 128, True, 2, 2, True, True),      # asym, split-K, an activation of 3000 (prescale)
    (48, 768, 256, False, 4, 2, True, True),     # group 256
    (33, 300, 300, True, 1, 1, False, False),    # per-channel, K tail
])
def test_wna16_gemv_h2_decode(dev, N, K, gs, asym, unroll, split_k, bias, big):
    """M = 1 half2 GEMV (fp16 products of power-of-two-prescaled activations) against the exact reference."""
    q, s, z = _make(dev, 300 + N + K, N, K, 4, gs, asym)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(K + 1))
    if big:
        x[0, 7] = 3000.0  # x * q would overflow fp16 without the prescale
    x = x.half().to(dev)
    b = torch.randn(N, generator=torch.Generator().manual_seed(N)).to(dev) if bias else None
    W = wna16.prepack_wna16(q, s, z, 4)
    ref = wna16.wna16_gemm_ref(x, q, s, z, b)
    # the prescale from the whole row, from each split's K slice, or applied by the packing launch (PACKED_X)
    for slice_prescale, packed in ((False, False), (True, False), (False, True)):
        y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, b, 4, W.group_size, N, K,
                                      config=wna16._gemv_h2(32, split_k, unroll, slice_prescale=slice_prescale,
                                                            packed_x=packed),
                                      out=poison((1, N), torch.float16, dev))
        assert rel_err(y, ref) <= 1e-2
        assert rel_err(y, wna16.wna16_gemm_ref(x, q, s * 1.05, z, b)) > 1e-2  # the tolerance can fail
        if z is not None:
            assert rel_err(y, wna16.wna16_gemm_ref(x, q, s, None, b)) > 1e-2


@pytest.mark.parametrize("N,K,gs,unroll,split_k,asym", [
    (40, 1280, 128, 2, 2, False),  # 10 blocks, 5 steps: 3 + 2 per split
    (70, 384, 128, 2, 4, True),    # 2 steps over 4 splits: two splits empty
    (33, 1000, 1000, 4, 1, True),  # per-channel, K tail: 8 blocks of 128 (the last partial), 2 steps
    (24, 1280, 256, 4, 1, False),  # group 256, 10 blocks, 3 steps: the last step's second half past K
])
def test_wna16_gemv_h2_per_block(dev, N, K, gs, unroll, split_k, asym):
    """PER_BLOCK ((R, BLOCK_N) tiles, one 128-K block per unrolled iteration): the same words and products as
    the 3-D loop, summed in another order: near the 3-D kernel and the exact reference."""
    q, s, z = _make(dev, 900 + N + K, N, K, 4, gs, asym)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(K + 7))
    x[0, 5] = 2000.0  # the power-of-two prescale in play
    x = x.half().to(dev)
    W = wna16.prepack_wna16(q, s, z, 4)

    def run(per_block, load_stages=1):
        return wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K,
                                         config=wna16._gemv_h2(32, split_k, unroll, per_block=per_block,
                                                               load_stages=load_stages),
                                         out=poison((1, N), torch.float16, dev))

    y = run(True)
    assert rel_err(y, run(False)) <= 2e-3
    # x packed once by a launch of its own: the PER_BLOCK loop's products on the same fp16 pairs
    yp = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K,
                                   config=wna16._gemv_h2(32, split_k, unroll, per_block=True, packed_x=True),
                                   out=poison((1, N), torch.float16, dev))
    assert rel_err(yp, y) <= 2e-3
    # loads through a cp.async ring (LOAD_STAGES) change where the words wait, not the arithmetic
    assert torch.equal(run(True, 3), y) and torch.equal(run(False, 2), run(False))
    assert rel_err(y, wna16.wna16_gemm_ref(x, q, s, z)) <= 1e-2
    assert rel_err(y, wna16.wna16_gemm_ref(x, q, s * 1.05, z)) > 1e-2  # the tolerance can fail


def test_tma_gemv_config_off_hopper_is_the_h2_gemv(dev):
    """A TMA-fed GEMV config (``wna16._gemv_tma``: the h2 GEMV's PER_BLOCK packed-x tile plus ``TMA_RING``)
    where its Gluon kernel cannot run (no sm_90 GPU here) runs the h2 GEMV on that tile, bit for bit; the host's
    rules refuse what the kernel's layout or an SM's shared memory cannot take (its GPU test: test_gpu.py)."""
    from quantkit.kernels import wna16_gluon as wg

    N, K = 40, 1280
    q, s, z = _make(dev, 77, N, K, 4, 128, True)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(5)).half().to(dev)
    W = wna16.prepack_wna16(q, s, z, 4)
    cfg = wna16._gemv_tma(128, 2, 4, 8, pdl=False)
    assert cfg["TMA_RING"] == 8 and cfg["PACKED_X"] and cfg["PER_BLOCK"] and cfg["UNROLL"] == 1
    run = lambda c: wna16.wna16_linear_triton(  # noqa: E731
        x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K, config=c, out=poison((1, N), torch.float16, dev))
    y = run(cfg)
    assert torch.equal(y, run({k: v for k, v in cfg.items() if k != "TMA_RING"}))
    assert rel_err(y, wna16.wna16_gemm_ref(x, q, s, z)) <= 1e-2
    from quantkit.kernels import _gluon

    # off sm_90 the Gluon kernel never runs; on it, this N's rows (40 with zero points) are off TMA's 16 bytes, so
    # the plan falls back to the h2 GEMV there too (the bit-for-bit check above holds on both)
    assert wg.gemv_runs_on(x, W.qw, W.scales, W.zeros) == _gluon.available(x)
    assert not wg.gemv_rows_aligned(N, True)
    # one or two columns a thread over whole warpgroups, BLOCK_N <= 256 (one TMA box), the ring within an SM
    assert wg.gemv_fits(cfg) and wg.gemv_fits(wna16._gemv_tma(256, 1, 4, 6)) and wg.gemv_fits(wna16._gemv_tma(256, 1, 8, 6))
    assert not wg.gemv_fits(wna16._gemv_tma(64, 1, 2, 8))  # two warps: not a warpgroup
    assert not wg.gemv_fits(wna16._gemv_tma(128, 1, 8, 8))  # fewer columns than threads
    assert not wg.gemv_fits(wna16._gemv_tma(256, 1, 4, 14))  # 14 slots of 17 KB: over 227 KB
    assert not wg.gemv_fits(dict(cfg, TMA_RING=0))
    assert wg.gemv_shared_bytes(cfg, True) == 8 * (16 * 128 * 4 + 128 * 2 + 128 + 4 * 128 + 16) + wg.GEMV_SCRATCH
    if wg.GLUON_ERROR is None:
        assert wg.gemv_plan(cfg, 1008, torch.float16, True, False, False) is not None
        _gemv_launch_gives_the_true_k(wg, cfg)
        assert wg.gemv_plan(cfg, 42, torch.float16, True, False, False) is None  # word rows not 16-byte multiples
        # every group's flat row of scales (2 N bytes) and zero points (N bytes) must start on 16 bytes: a TMA box
        # off a 16-byte boundary is an illegal instruction (H100, N = 1000 with zero points)
        assert wg.gemv_plan(cfg, 1000, torch.float16, False, False, False) is not None
        assert wg.gemv_plan(cfg, 1000, torch.float16, True, False, False) is None
        assert wg.gemv_plan(cfg, 1004, torch.float16, False, False, False) is None
        assert wg.gemv_plan(cfg, N, torch.float32, True, False, False) is None


def _gemv_launch_gives_the_true_k(wg, cfg):
    """The TMA-fed GEMV's launch (its arguments, captured instead of launched) gives the kernel the true K, from
    which it places the packed planes (16 rows a 128-K block), and no stride of its own: the packing's grow-only
    cached buffer is longer than its four planes (at least 4096 int32), and a stride read off the buffer put planes
    1-3 in the wrong place (session 45's H100 run: wrong results)."""
    seen = {}

    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **consts: seen.update(grid=grid, args=args, consts=consts)

    N, K = 256, 1408  # 11 blocks: 176 word rows a plane, the buffer 4096
    plan = wg.gemv_plan(cfg, N, torch.float16, False, False, False)
    xp = torch.zeros(4096, dtype=torch.int32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wg, "_gemv_descriptors", lambda *a: ("w", "s", "z", "x"))
        mp.setattr(wg, "wna16_gluon_gemv_kernel", Capture())
        plan.launch(xp, torch.ones(1), torch.zeros(K // 8, N, dtype=torch.int32), torch.ones(K // 128, N).half(),
                    None, None, torch.empty(1, N).half(), torch.empty(4), torch.zeros(4, dtype=torch.int32), 128, N, K)
    names = ["xsc", "bias", "out", "ws", "lock", "tl", "N", "K", "n_groups", "group_size"]
    assert len(seen["args"]) == 4 + len(names)
    got = dict(zip(names, seen["args"][4:]))
    assert (got["N"], got["K"], got["n_groups"], got["group_size"]) == (N, K, 11, 128)
    assert seen["grid"] == (2, 1, cfg["SPLIT_K"])
    # no timeline: the diagnostic's buffer argument is the counters (never written: TIMELINE is off), no chain
    assert got["tl"] is got["lock"] and not seen["consts"]["TIMELINE"] and not seen["consts"]["CHAIN"]


@pytest.mark.parametrize("K", [128, 300, 1000, 4096, 9000])
def test_h2_pack_x_matches_its_reference(dev, K):
    """PACKED_X's packing launch (each program: the row's prescale, then its 512-row chunks' four half2 pairs in
    planes; 9000: three programs, the last chunk short) equals its torch reference bit for bit, and so does one
    program doing every chunk: fp16 and bf16, activations spanning 1e-3 to 3000 (the prescale's range), a K tail
    (zero-padded to whole 128-K blocks), an all-zero row."""
    g = torch.Generator().manual_seed(K)
    n = wna16.cdiv(K, 128) * 64
    n_rows, grid, const, _ = wna16._h2_pack_plan(K, False)
    assert n_rows == n // 4 and grid == (wna16.cdiv(n_rows, 512),)
    one = dict(const, AMAX_K=min(4096, const["AMAX_K"]), num_warps=4)
    for dtype in (torch.float16, torch.bfloat16):
        for scale in (1.0, 3000.0, 1e-3, 0.0):
            x = (torch.randn(1, K, generator=g) * scale).to(dtype).to(dev)
            rp, rsc = wna16.h2_pack_x_ref(x)
            xp, xsc = wna16._h2_pack_x(x, K)
            assert torch.equal(xp[:n], rp) and torch.equal(xsc[:1], rsc), (dtype, scale)
            xp.fill_(-1), xsc.fill_(-1.0)  # (the scratch is shared: the next launch must write all of it)
            # one program walking every chunk and the row in 4096 steps (the launch before session 47) agrees
            xp1, xsc1 = torch.full_like(xp[:n], -1), torch.full_like(xsc[:1], -1.0)
            wna16.h2_pack_x_kernel[(1,)](x, xp1, xsc1, K, n_rows, **one)
            assert torch.equal(xp1, rp) and torch.equal(xsc1, rsc), (dtype, scale)
            if scale:
                # not a constant: the pairs hold x in its order (x * 2 would pack the same: a power-of-two prescale)
                assert rp.unique().numel() > n // 8 and not torch.equal(rp, wna16.h2_pack_x_ref(x.roll(1, -1))[0])


def test_wna16_gemv_h2_falls_back(dev):
    """gemv_h2 takes 4-bit, M = 1, group >= 128; 8-bit, small groups and M > 1 run the general GEMV."""
    for bits, gs, M in ((8, 128, 1), (4, 32, 1), (4, 128, 3)):
        N, K = 40, 256
        q, s, z = _make(dev, bits + gs + M, N, K, bits, gs, False)
        W = wna16.prepack_wna16(q, s, z, bits)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).half().to(dev)
        y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, bits, gs, N, K,
                                      config=wna16._gemv_h2(32, 2, 2), out=poison((M, N), torch.float16, dev))
        assert rel_err(y, wna16.wna16_gemm_ref(x, q, s, z)) <= 1e-2


def test_wna16_gluon_config_runs_the_tensor_core_kernel_where_gluon_cannot(dev):
    """A ``BACKEND="gluon"`` W4A16 config where the Gluon kernel cannot run (no sm_90 GPU: the interpreter,
    CPU; or operands TMA cannot describe) runs the tl.dot kernel's plan instead, with the right result."""
    from quantkit.kernels import _gluon, wna16_gluon

    M, N, K, gs = 20, 40, 384, 128
    q, s, z = _make(dev, 11, N, K, 4, gs, True)
    # x one element past a 16-byte boundary (contiguous, but no TMA descriptor can start there): the tl.dot plan
    # on an sm_90 GPU too
    buf = torch.randn(M * K + 1, generator=torch.Generator().manual_seed(3)).half().to(dev)
    x = buf[1:].view(M, K)
    W = wna16.prepack_wna16(q, s, z, 4)
    cfg = dict(BACKEND="gluon", BLOCK_M=64, BLOCK_N=128, SPLIT_K=2, num_warps=4, num_stages=4)
    assert not wna16_gluon.applies(x, W.qw, 4, N, K, cfg)
    if _gluon.available(x):  # on sm_90 the same data, aligned, does take the Gluon kernel
        assert wna16_gluon.applies(x.clone(), W.qw, 4, N, K, cfg)
    y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, gs, N, K, config=cfg,
                                  out=poison((M, N), torch.float16, dev))
    assert rel_err(y, wna16.wna16_gemm_ref(x, q, s, z)) <= 1e-2
    assert rel_err(y, wna16.wna16_gemm_ref(x, q, s * 1.05, z)) > 1e-2

def test_wna16_gluon_warp_specialized_configs():
    """Which configs run the warp-specialized register-operand kernel (4-bit, group >= 128, the 128-column box of
    two 64-row partitions, num_warps 4), the split-K buffers it needs (two counters a CTA, half the elements each:
    the same workspace), and its shared memory (the ring, two barriers a slot, the epilogue's scratch)."""
    from quantkit.kernels import wna16_gluon as wg

    ws = wg.ws_config(128, 2, 4)
    assert ws["BLOCK_N"] == wg.WS_BLOCK_N == 128 and ws["RS"] and ws["WARP_SPECIALIZE"]
    assert wg.warp_specialized(ws) and not wg.warp_specialized(ws, bits=8)
    assert not wg.warp_specialized(ws, gs_small=True)  # small groups take the shared-operand kernel
    assert not wg.warp_specialized(dict(ws, RS=False)) and not wg.warp_specialized(dict(ws, num_warps=8))
    assert not wg.warp_specialized(dict(ws, BLOCK_N=64)) and not wg.warp_specialized(dict(ws, WARP_SPECIALIZE=False))
    assert wg.splitk_tiles(ws, 300, 4100) == (2 * 3 * 33, 128 * 64)
    assert wg.splitk_tiles(dict(ws, WARP_SPECIALIZE=False), 300, 4100) == (3 * 33, 128 * 128)
    rs = dict(ws, WARP_SPECIALIZE=False)
    assert wg.shared_bytes(ws) == wg.shared_bytes(rs) + 4 * 8 + wg.WS_SCRATCH
    assert wg.shared_bytes(rs) == 4 * (128 * 128 * 2 + 16 * 128 * 4 + 8)
    for m in (128, 256, 512):  # every warp-specialized candidate fits one CTA's shared memory
        cands = [c for c in wg.candidates(m) if wg.warp_specialized(c)]
        assert cands and all(wg.shared_bytes(c) <= 232448 for c in cands), m
    assert not any(wg.warp_specialized(c) for c in wg.candidates(64))


def test_chained_config_runs_inside_the_runtime_chain(dev, monkeypatch):
    """A config entry's ``CHAINED`` config is what a call runs inside the runtime's chain (``runtime_chain()`` with
    the chain on), the plain config elsewhere (outside, after the context ends, with the chain off); both give the
    reference's result. On sm_90+ the chained one is a real PDL / PDL_CHAIN launch; elsewhere the chain's gate is
    forced open so the selection alone is checked (the interpreter launches nothing programmatically)."""
    from quantkit.kernels import _common

    N, K = 64, 512
    q, s, z = _make(dev, 77, N, K, 4, 128, True)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(78)).half().to(dev)
    W = wna16.prepack_wna16(q, s, z, 4)
    ref = wna16.wna16_gemm_ref(x, q, s, z, None)
    chained = dict(wna16._gemv_h2(16, 4, 1), PDL=True, PREFETCH=2, PDL_CHAIN=True)
    cfg = dict(wna16._gemv_h2(32, 2, 2), CHAINED=chained)
    if not _common.pdl_supported(x.device):
        monkeypatch.setitem(_common._PDL_HERE, x.device, True)
    monkeypatch.setattr(_common, "CHAIN_PDL", True)

    def run():
        y = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K, config=cfg,
                                      out=poison((1, N), torch.float16, dev))
        const = wna16._plan(x, 1, N, K, 4, W.group_size, W.scales.shape[0], True, False, cfg)[3]
        assert rel_err(y, ref) <= 1e-2
        return const["BLOCK_N"], const["SPLIT_K"]

    assert run() == (32, 2)
    with _common.runtime_chain():
        with _common.runtime_chain():
            pass
        assert run() == (16, 4)  # still inside after a nested context ended
    assert run() == (32, 2)
    monkeypatch.setattr(_common, "CHAIN_PDL", False)
    with _common.runtime_chain():
        assert run() == (32, 2)


def test_eager_config_runs_outside_a_graph_capture(dev, monkeypatch):
    """A config entry's ``EAGER`` config is what a call runs outside a CUDA-graph capture, its plain config under
    one (on a GPU a real capture, replayed; on the CPU the capture test is forced); inside the runtime's chain a
    CHAINED config wins over it. Each gives the reference's result."""
    from quantkit.kernels import _common

    N, K = 64, 512
    q, s, z = _make(dev, 79, N, K, 4, 128, True)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(80)).half().to(dev)
    W = wna16.prepack_wna16(q, s, z, 4)
    ref = wna16.wna16_gemm_ref(x, q, s, z, None)
    plain = dict(wna16._gemv_h2(32, 2, 2), PACKED_X=True)  # two launches: x packed first
    eager, chained = wna16._gemv_h2(16, 4, 1), wna16._gemv_h2(64, 1, 4)
    cfg = dict(plain, EAGER=eager)
    ran = []
    launch = wna16.fast_launch
    monkeypatch.setattr(wna16, "fast_launch", lambda kern, grid, args, const, *a: (
        ran.append((const.get("BLOCK_N"), const.get("SPLIT_K"), const.get("PACKED_X"))),
        launch(kern, grid, args, const, *a))[1])

    def call(out):
        return wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K, config=cfg,
                                         out=out)

    y = call(poison((1, N), torch.float16, dev))
    assert ran[-1] == (16, 4, False) and rel_err(y, ref) <= 1e-2  # one launch: the EAGER config
    ran.clear()
    if dev.type == "cuda":
        out = poison((1, N), torch.float16, dev)
        wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K, config=plain,
                                  out=out)  # compiled and its buffers made first
        ran.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call(out)
        graph.replay()
        torch.cuda.synchronize()
        y = out
    else:
        monkeypatch.setattr(wna16, "capturing", lambda t: True)
        y = call(poison((1, N), torch.float16, dev))
    assert ran[-1] == (32, 2, True) and rel_err(y, ref) <= 1e-2  # the plain entry's packing and GEMV
    assert len(ran) == 2 and ran[0][:2] == (None, None)  # (the packing launch has no tile)
    cfg = dict(cfg, CHAINED=chained)
    if not _common.pdl_supported(x.device):
        monkeypatch.setitem(_common._PDL_HERE, x.device, True)
    monkeypatch.setattr(_common, "CHAIN_PDL", True)
    monkeypatch.setattr(wna16, "capturing", lambda t: False)
    with _common.runtime_chain():
        y = call(poison((1, N), torch.float16, dev))
    assert ran[-1] == (64, 1, False) and rel_err(y, ref) <= 1e-2


def test_call_configs_pick_by_where_the_call_runs():
    """``call_configs``: (under a capture, outside one or None) for entries with and without sub-configs."""
    from quantkit.kernels._common import call_configs, plain_config

    a, b, c = dict(BLOCK_N=32), dict(BLOCK_N=16), dict(BLOCK_N=64)
    assert call_configs(a, False) == (a, None) and call_configs(a, True) == (a, None)
    assert call_configs(dict(a, EAGER=b), False) == (a, b)
    assert call_configs(dict(a, EAGER=b), True) == (a, b)  # no CHAINED config: the chain runs the plain pair
    assert call_configs(dict(a, EAGER=b, CHAINED=c), True) == (c, None)
    assert call_configs(dict(a, EAGER=b, CHAINED=c), False) == (a, b)
    assert call_configs(dict(a, CHAINED=c), False) == (a, None)
    assert plain_config(dict(a, EAGER=b, CHAINED=c)) == a


@pytest.mark.parametrize("sub", ["CHAINED", "EAGER"])
def test_a_search_keeps_the_entrys_sub_configs(tmp_path, sub):
    """``write_tuned``: a re-search's entry (ranked on one kind of call) keeps the entry's CHAINED and EAGER
    configs, which their own measurements decide (in the runtime's chain, by eager calls); an entry written with
    one replaces it, and one written with None drops it."""
    from quantkit.kernels._common import load_tuned, write_tuned

    other = "EAGER" if sub == "CHAINED" else "CHAINED"
    plain, twin = wna16._gemv_h2(64, 4, 8), dict(wna16._gemv_h2(64, 4, 8), PDL=True, PDL_CHAIN=True)
    write_tuned("G", "w4a16", {(1, 4096, 4096): dict(plain, **{sub: twin, other: plain})}, str(tmp_path))
    write_tuned("G", "w4a16", {(1, 4096, 4096): wna16._gemv_h2(32, 8, 4), (16, 4096, 4096): plain}, str(tmp_path))
    table = load_tuned("w4a16", str(tmp_path))
    assert table[("G", 1, 4096, 4096)] == dict(wna16._gemv_h2(32, 8, 4), **{sub: twin, other: plain})
    assert sub not in table[("G", 16, 4096, 4096)]
    write_tuned("G", "w4a16", {(1, 4096, 4096): dict(plain, **{sub: plain})}, str(tmp_path))
    assert load_tuned("w4a16", str(tmp_path))[("G", 1, 4096, 4096)][sub] == plain
    write_tuned("G", "w4a16", {(1, 4096, 4096): dict(plain, **{sub: None})}, str(tmp_path))
    assert load_tuned("w4a16", str(tmp_path))[("G", 1, 4096, 4096)] == dict(plain, **{other: plain})


def test_gluon_kernels_refuse_a_one_slot_ring():
    """The Gluon GEMMs prefetch STAGES - 1 K tiles before their loops: a one-slot ring would wait on a load never
    issued (a GPU hang), so ``plan`` (and W8A8's ``applies``) refuse num_stages 1, the tl.dot kernel runs it, and no
    config the tuner tries or the GPU files ship asks for one."""
    from quantkit.kernels import _common, _gluon, wna16_gluon

    if wna16_gluon.GLUON_ERROR is not None:
        pytest.skip(f"Gluon not importable: {wna16_gluon.GLUON_ERROR}")
    cfg = wna16_gluon.config(64, 128, 2, 4, 2)
    assert wna16_gluon.plan(cfg, 16, 4096, 4096, torch.float16, 4, False, False, False) is not None
    assert wna16_gluon.plan(dict(cfg, num_stages=1), 16, 4096, 4096, torch.float16, 4, False, False, False) is None
    rs = dict(cfg, RS=True)
    assert wna16_gluon.plan(dict(rs, num_stages=1), 256, 4096, 4096, torch.float16, 4, False, False, False) is None
    for m in (16, 128, 256, 2048):
        assert all(_gluon.ring_ok(c) for c in wna16_gluon.candidates(m))
    paths = sorted(pathlib.Path(_common.CONFIG_DIR).glob("*.json"))
    assert {p.name for p in paths} >= {"H100.json", "H200.json"}
    for path in paths:
        gluon = [c for c in _iter_dicts(json.loads(path.read_text())) if c.get("BACKEND") == "gluon"]
        assert gluon and all(_gluon.ring_ok(c) for c in gluon), path


def _iter_dicts(o):
    if isinstance(o, dict):
        yield o
        for v in o.values():
            yield from _iter_dicts(v)
    elif isinstance(o, list):
        for v in o:
            yield from _iter_dicts(v)


def test_x_packing_waits_inside_the_runtime_chain_only(monkeypatch):
    """The packing launch of a PDL GEMV waits on the GPU for the launch before it only inside the runtime's chain (or
    with PDL_CHAIN): the chain's state is read per call, though the packing's plan and buffers are memoised."""
    from quantkit.kernels import _common

    seen = []
    monkeypatch.setattr(wna16, "fast_launch", lambda kern, grid, args, const, *a: seen.append(const["WAIT"]))
    monkeypatch.setattr(_common, "CHAIN_PDL", True)
    x = torch.randn(1, 512).half()
    for inside in (False, True, False, True):
        if inside:
            with _common.runtime_chain():
                wna16._h2_pack_x(x, 512, pdl=True)
        else:
            wna16._h2_pack_x(x, 512, pdl=True)
    wna16._h2_pack_x(x, 512, pdl=False)
    wna16._h2_pack_x(x, 512, pdl=True, chain=True)
    assert seen == [False, True, False, True, False, True]

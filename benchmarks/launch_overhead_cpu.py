"""Python host cost of quantkit's own launch wrappers, with Triton's C launch replaced by a no-op (CPU, no GPU).

On a GPU the eager small-M W8A8 call is bound by host time (BENCHMARKS.md: the tl.dot GEMM launch alone 29.7 us
against 17.3 for ``F.linear`` on an H100's host). This splits that cost: what runs before Triton's launcher
(config dicts, ``_consts``, the specialization key over every argument, buffer lookups) is timed here on CPU
tensors, every compiled-kernel lookup answered by a stub, so the numbers are the wrappers' alone, with Triton 3.6's
``CudaLauncher.__call__`` (replicated: its Python) in front of the stub where the lean launch is off.  What the C
launch does per tensor argument (``data_ptr()``, then cuPointerGetAttribute, which the lean launch's addresses skip)
and torch's ``current_device`` are not in these times: they need a GPU (``gemm.py --host-profile``'s A/B).  A second
table times the same calls replayed (``kernels/_replay.py``: a kind of call's recorded C launches sent again with
x's and out's addresses) against the wrapper.

    PYTHONPATH=. python benchmarks/launch_overhead_cpu.py
"""

from __future__ import annotations

import os
import time
import types

import torch


def per_call_us(f, n: int = 20000) -> float:
    for _ in range(200):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e6


class Launcher36:
    """Triton 3.6's ``CudaLauncher.__call__`` (what ``run_compiled`` calls): the scratch checks, then the C launch."""

    def __init__(self, c_launch):
        self.launch, self.num_ctas = c_launch, 1
        self.global_scratch_size = self.profile_scratch_size = 0
        self.global_scratch_align = self.profile_scratch_align = 1
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        def allocate_scratch(size, align, allocator):
            if size > 0:
                return allocator(gridX * gridY * gridZ * self.num_ctas * size, align, stream)
            return None

        global_scratch = allocate_scratch(self.global_scratch_size, self.global_scratch_align, None)
        profile_scratch = allocate_scratch(self.profile_scratch_size, self.profile_scratch_align, None)
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    global_scratch, profile_scratch, *args)


def main() -> None:
    from quantkit.kernels import _common, act_quant, attention, fused, mixed, w8a8, wna16

    c_launch = "".format  # a C function that takes any arguments and does nothing with them: the C launch
    stub = types.SimpleNamespace(run=Launcher36(c_launch), function=None, packed_metadata=None)
    lean = (c_launch, (None, False, True, None, None, None, None, None, None))

    switch = getattr(_common, "set_lean_launch", lambda on: on)  # (an older tree, for a before/after: no lean)
    hit = (stub, (), None, lean) if hasattr(_common, "set_lean_launch") else (stub, (), None)

    class AnyHit(dict):  # every lookup finds a "compiled kernel" whose C launch does nothing
        def get(self, key, default=None):
            return hit

    _common._FAST = AnyHit()
    _common._FAST_ON = True
    _common.CHECK_LAUNCH = False
    _common._driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 0)
    _common._knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))
    T = torch.Tensor
    # these CPU tensors stand for CUDA ones: every tensor argument converted, at the cost of the real check
    _common.pointer_args = lambda args: [a.data_ptr() if type(a) is T and not a.is_cuda else a for a in args]
    os.environ.pop("TRITON_INTERPRET", None)  # compiled mode, its environment reads included in the times
    fused.use_triton = attention.use_triton = lambda *t: True

    M, N, K = 16, 4096, 4096
    x = torch.randn(M, K).half()
    W = w8a8.prepack_w8a8(torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N, 1))
    out = torch.empty(M, N, dtype=torch.half)
    aq, asc = torch.empty(M, K, dtype=torch.int8), torch.empty(M)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3, SPLIT_K=1)
    gemv = dict(BACKEND="gemv", BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, num_warps=8, num_stages=2)
    W4 = wna16.prepack_wna16(torch.randint(-8, 8, (N, K), dtype=torch.int8), torch.rand(N, K // 128).half(), None, 4)
    h2 = dict(BACKEND="gemv_h2", BLOCK_N=32, UNROLL=2, SPLIT_K=4, num_warps=4, num_stages=2)
    packed = dict(h2, PER_BLOCK=True, UNROLL=1, PACKED_X=True, PDL=True)
    x1 = x[:1].contiguous()
    w16, rb = torch.randn(N, K).half(), torch.zeros(M, dtype=torch.uint8)
    one = torch.ones(1)
    # a Llama-3-8B decode step's other launches (batch 1): hidden 4096, GQA 32/8 x 128, an 8-bit KV cache of 640
    h, d = torch.randn(1, 1, 4096).half(), torch.randn(1, 1, 4096).half()
    nw = torch.rand(4096).half()
    qkv = torch.randn(1, 1, 6144).half()
    cs = torch.rand(1, 1, 128).half()
    kc, vc = torch.zeros(1, 8, 640, 128, dtype=torch.int8), torch.zeros(1, 8, 640, 128, dtype=torch.int8)
    ks, vs = torch.rand(8, 128), torch.rand(8, 128)
    pos = torch.tensor([[639]])
    q = torch.randn(1, 32, 128).half()
    lens = torch.tensor([640], dtype=torch.int32)
    gu = torch.randn(1, 28672).half()
    # W4A16 M = 1 at 4096x14336 as shipped (H100.json): x packed, then the TMA-fed Gluon GEMV through its RawLaunch
    # (its runs_on check, which needs a CUDA x, left out)
    from quantkit.kernels import _gluon, wna16_gluon

    N4, K4 = 4096, 14336
    Wt = wna16.prepack_wna16(torch.randint(-8, 8, (N4, K4), dtype=torch.int8), torch.rand(N4, K4 // 128).half(),
                             None, 4)
    tma_cfg = dict(BACKEND="gemv_h2", BLOCK_N=128, SPLIT_K=8, UNROLL=1, num_warps=4, num_stages=1, PACKED_X=True,
                   PDL=True, PER_BLOCK=True, TMA_RING=6)
    gplan = wna16_gluon.gemv_plan(tma_cfg, N4, torch.float16, False, False, True)
    gws, glock = _common.splitk_buffers(torch.device("cpu"), N4 // 128, 8, 128, 4)
    metas = [{"swizzle": 0, "elem_size": e, "elem_type": 1, "block_size": b, "fp4_padded": False}
             for e, b in [(4, [16, 128]), (2, [128]), (2, [128]), (4, [16])]]
    raw = _gluon.RawLaunch(c_launch, lean[1], tuple((m, _gluon._meta_key(m)) for m in metas),
                           lambda arg, meta: [object(), *arg.shape, *arg.strides])

    class RawHit(dict):
        def get(self, key, default=None):
            return stub, raw

    wna16_gluon._GEMV_LAUNCH.compiled = RawHit()
    x4 = torch.randn(1, K4).half()
    out4 = torch.empty(1, N4, dtype=torch.half)

    def tma_gemv():
        xp, xsc = wna16._h2_pack_x(x4, K4, gplan.pdl, gplan.chain)
        return gplan.launch(xp, xsc, Wt.qw, Wt.scales, None, None, out4, gws, glock, 128, N4, K4)

    rows = [
        ("a 1-element add_ (torch, for scale)", lambda: one.add_(1)),
        ("arg_class over 20 arguments (the old specialization key)",
         lambda: tuple(map(_common.arg_class, (x,) * 8 + (1,) * 12))),
        ("spec_key over 20 arguments", lambda: _common.spec_key((x,) * 8 + (1,) * 12)),
        ("per_token_quant_triton into buffers", lambda: act_quant.per_token_quant_triton(x, out_q=aq, out_s=asc)),
        ("per_token_quant_triton allocating", lambda: act_quant.per_token_quant_triton(x)),
        ("w8a8._launch (the tl.dot GEMM)", lambda: w8a8._launch(aq, asc, W.w, W.scale, None, out, False, False, cfg)),
        ("w8a8_linear_triton M=16, two launches", lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg,
                                                                                  out=out)),
        ("w8a8_linear_triton M=16, QUANT_ONCE", lambda: w8a8.w8a8_linear_triton(
            x, W.w, W.scale, config=dict(cfg, QUANT_ONCE=True), out=out)),
        ("w8a8_linear_triton M=1, dp4a GEMV (two launches)", lambda: w8a8.w8a8_linear_triton(
            x1, W.w, W.scale, config=gemv, out=out[:1])),
        ("mixed_linear_triton M=16, row bits (two launches)", lambda: mixed.mixed_linear_triton(
            x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, None, config=cfg, out=out)),
        ("mixed_linear_triton M=1, row bits, dp4a GEMV (two launches)", lambda: mixed.mixed_linear_triton(
            x1, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb[:1], None, config=gemv, out=out[:1])),
        ("wna16_linear_triton M=1, gemv_h2 (W4 g128), explicit config", lambda: wna16.wna16_linear_triton(
            x1, W4.qw, W4.scales, None, None, 4, 128, N, K, config=h2, out=out[:1])),
        ("wna16_linear_triton M=1, gemv_h2 on packed x (PACKED_X: two launches)", lambda: wna16.wna16_linear_triton(
            x1, W4.qw, W4.scales, None, None, 4, 128, N, K, config=packed, out=out[:1])),
        ("wna16_linear_triton M=1, planned config (what the runtime calls)", lambda: wna16.wna16_linear_triton(
            x1, W4.qw, W4.scales, None, None, 4, 128, N, K, out=out[:1])),
        ("W4A16 M=1 4096x14336: x packed, then the TMA-fed GEMV (Gluon, RawLaunch)", tma_gemv),
        ("add_rmsnorm (residual add + RMSNorm)", lambda: fused.add_rmsnorm(h, d, nw, 1e-5)),
        ("silu_mul", lambda: fused.silu_mul(gu, 14336)),
        ("rope_store (RoPE + INT8 KV store, per-channel)", lambda: fused.rope_store(
            qkv, cs, cs, pos, 32, 8, 128, kc, vc, ks, vs)),
        ("decode_attention (attention + merge: two launches)", lambda: attention.decode_attention(
            q, kc, vc, lens, k_scale=ks, v_scale=vs, split=128)),
    ]
    print("Host time of quantkit's launch wrappers, us per call, Triton's C launch stubbed out (CPU); lean launch "
          "(the C launch called below Triton 3.6's launcher, tensors passed as addresses) on / off")
    print("| call | lean on | lean off |")
    print("|---|---|---|")
    for name, f in rows:
        on = per_call_us(f)
        switch(False)
        off = per_call_us(f)
        switch(True)
        print(f"| {name} | {on:.2f} | {off:.2f} |")
    try:
        from quantkit.kernels import _replay
    except ImportError:  # an older tree
        return
    # the same calls replayed (``_replay``: the first calls of a kind recorded, later ones sending the recorded C
    # launches with x's and out's addresses put in), against the wrapper itself (lean launch on)
    _replay._on_gpu = lambda t: True  # these CPU tensors stand for CUDA ones
    wna16.eager_cuda = w8a8.eager_cuda = lambda x: True
    out1 = out[:1]
    replayed = [
        ("w8a8_linear_triton M=16, two launches", (W.w, W.scale), x, out,
         lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=out)),
        ("w8a8_linear_triton M=1, dp4a GEMV (two launches)", (W.w, W.scale), x1, out1,
         lambda: w8a8.w8a8_linear_triton(x1, W.w, W.scale, config=gemv, out=out1)),
        ("wna16_linear_triton M=1, gemv_h2 on packed x (PACKED_X: two launches)", (W4.qw, W4.scales), x1, out1,
         lambda: wna16.wna16_linear_triton(x1, W4.qw, W4.scales, None, None, 4, 128, N, K, config=packed, out=out1)),
        ("wna16_linear_triton M=1, planned config", (W4.qw, W4.scales), x1, out1,
         lambda: wna16.wna16_linear_triton(x1, W4.qw, W4.scales, None, None, 4, 128, N, K, out=out1)),
        ("W4A16 M=1 4096x14336: x packed, then the TMA-fed GEMV (Gluon, RawLaunch)", (Wt.qw, Wt.scales), x4, out4,
         tma_gemv),
    ]
    print()
    print("Replayed (us per call; the wrapper alone beside it, lean launch on)")
    print("| call | replayed | wrapper |")
    print("|---|---|---|")
    for name, stable, xx, oo, f in replayed:
        site = _replay.Site(stable)
        for _ in range(3):
            _replay.call(site, xx, oo, f)
        assert site.replays, f"{name}: not replayed"
        print(f"| {name} | {per_call_us(lambda: _replay.call(site, xx, oo, f)):.2f} | {per_call_us(f):.2f} |")
    print(f"| wna16_linear (the public op, planned config, its output allocated), M=1 | "
          f"{per_call_us(lambda: wna16.wna16_linear(x1, W4)):.2f} | - |")
    print(f"| torch.empty of that output alone | "
          f"{per_call_us(lambda: torch.empty((1, N), dtype=x1.dtype, device=x1.device)):.2f} | - |")


if __name__ == "__main__":
    main()

"""The cached ("fast") launch path of every kernel wrapper, on CPU: Triton's compile-and-launch is replaced by a
recorder, so the wrappers run their compiled-mode code (plans, memoised constexprs, the reduced specialization
keys) without a GPU. ``CHECK_LAUNCH`` makes every cached launch re-derive what an ordinary launch would have bound
(argument classes, constexprs, parameter count) and fail on a difference; the GPU tests run the same check on
real launches (QUANTKIT_CHECK_LAUNCH=1)."""

import types

import pytest
import torch

from quantkit.kernels import _common


class Recorder:
    def __init__(self):
        self.ordinary = []  # (kernel name, grid, bound parameters in signature order)
        self.cached = []  # (kernel name, grid, parameters as the direct launch passes them)

    def getitem(self, lk, grid):
        def launch(*args, **consts):
            names = lk.param_names()
            missing = [n for n in names[len(args):] if n not in consts]
            assert not missing, f"{lk.__name__}: constexprs not given: {missing}"
            self.ordinary.append((lk.__name__, tuple(grid), (*args, *(consts[n] for n in names[len(args):]))))
            rec = self

            def run(g0, g1, g2, stream, function, meta, launch_meta, enter, exit_, *params):
                assert function is lk and len(params) == len(names)
                rec.cached.append((lk.__name__, (g0, g1, g2)[:len(grid)], params))

            return types.SimpleNamespace(function=lk, packed_metadata=None, run=run)

        return launch


@pytest.fixture
def rec(monkeypatch):
    from quantkit.kernels import attention, fused, histogram, w8a8

    r = Recorder()
    monkeypatch.setattr(_common.LazyKernel, "__getitem__", lambda lk, grid: r.getitem(lk, grid))
    monkeypatch.setattr(_common, "_FAST", {})
    monkeypatch.setattr(_common, "_FAST_ON", True)
    monkeypatch.setattr(_common, "CHECK_LAUNCH", True)
    monkeypatch.setattr(_common, "interpret_mode", lambda: False)
    monkeypatch.setattr(w8a8, "interpret_mode", lambda: False)
    monkeypatch.setattr(w8a8, "_LAUNCH_PLANS", {})
    for mod in (fused, attention, histogram):
        monkeypatch.setattr(mod, "use_triton", lambda *t: True)

    def bind(k):
        _common._driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 0)
        _common._knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(launch_enter_hook=None,
                                                                              launch_exit_hook=None))
        return True

    monkeypatch.setattr(_common, "_driver", None)
    monkeypatch.setattr(_common, "_knobs", None)
    monkeypatch.setattr(_common, "bind_driver", bind)
    return r


def _same(a, b) -> bool:
    """Equal launch parameters: tensors by identity of storage, shape, strides and dtype; others by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride())
    return a == b and type(a) is type(b)


def _cases():
    """(name, call(seed, offset)): each call builds fresh inputs (offset: elements a view of x starts late)."""
    from quantkit.kernels import act_quant, attention, fused, hadamard, histogram, mixed, w8a8, wna16

    def xs(seed, M, K, off, dtype=torch.float16):  # contiguous, starting `off` elements into its storage
        g = torch.Generator().manual_seed(seed)
        return torch.randn(M * K + off, generator=g).to(dtype)[off:].view(M, K)

    def w8(seed, N, K):
        g = torch.Generator().manual_seed(seed + 1)
        return (torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8),
                torch.rand(N, generator=g) * 0.01 + 1e-3)

    tl_dot = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)

    def w8a8_call(cfg, bias=False, mixed_rows=False):
        def call(seed, off):
            x = xs(seed, 5, 64, off)
            w, s = w8(seed, 48, 64)
            kw = {}
            if mixed_rows:
                kw = dict(row_bits=(torch.arange(5) % 2).to(torch.uint8), w_fp16=torch.randn(48, 64).half())
            w8a8.w8a8_linear_triton(x, w, s, torch.randn(48).half() if bias else None, config=cfg,
                                    out=torch.empty(5, 48, dtype=torch.float16), **kw)
        return call

    def wna16_call(cfg):
        def call(seed, off):
            g = torch.Generator().manual_seed(seed)
            N, K = 64, 256
            W = wna16.prepack_wna16(torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8),
                                    torch.rand(N, K // 128, generator=g).half() + 0.01, None, 4)
            x = xs(seed, 1 if cfg.get("BACKEND") == "gemv_h2" else 3, K, off)
            wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K, config=cfg)
        return call

    def pdl_on(call):  # the launch as on an sm_90 GPU: PDL (and PDL_CHAIN) configs keep their flags
        def run(seed, off):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_common, "pdl_supported", lambda device: True)
                call(seed, off)
        return run

    def rope(seed, off):
        B, S, Hq, Hkv, D, T = 2, 3, 4, 2, 32, 8
        qkv = xs(seed, B * S, (Hq + 2 * Hkv) * D, off).reshape(B, S, -1)
        cos, sin = torch.rand(B, S, D).half(), torch.rand(B, S, D).half()
        kc, vc = torch.zeros(B, Hkv, T, D, dtype=torch.int8), torch.zeros(B, Hkv, T, D, dtype=torch.int8)
        fused.rope_store(qkv, cos, sin, torch.arange(S).repeat(B, 1), Hq, Hkv, D, kc, vc,
                         torch.zeros(B, Hkv, T), torch.zeros(B, Hkv, T))

    def attn(seed, off):
        B, Hq, Hkv, T, D = 2, 4, 2, 40, 32
        q = xs(seed, B * Hq, D, off).reshape(B, Hq, D)
        k, v = torch.randn(B, Hkv, T, D).half(), torch.randn(B, Hkv, T, D).half()
        attention.decode_attention(q, k, v, torch.tensor([40, 17], dtype=torch.int32), block_n=16, split=16)

    def hist(seed, off):
        y = xs(seed, 6, 40, off, torch.float32)
        histogram.row_histogram(y, torch.tensor([0, 1, 0, 1, 0, 1]), torch.ones(6), -3.0, 8 / 6.0, 8,
                                torch.zeros(2 * 8), torch.zeros(2, 4))

    return [
        ("per_token_quant", lambda seed, off: act_quant.per_token_quant_triton(xs(seed, 5, 64, off))),
        ("w8a8 two launches", w8a8_call(tl_dot)),
        ("w8a8 two launches, bias", w8a8_call(tl_dot, bias=True)),
        ("w8a8 fused quant", w8a8_call(dict(tl_dot, FUSE_QUANT=True))),
        ("w8a8 split-K", w8a8_call(dict(tl_dot, SPLIT_K=2))),
        ("w8a8 quant once", w8a8_call(dict(tl_dot, QUANT_ONCE=True))),
        ("w8a8 mixed rows", w8a8_call(tl_dot, mixed_rows=True)),
        ("w8a8 gemv", w8a8_call(dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1))),
        ("w8a8 gemv fused", w8a8_call(dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, FUSE_QUANT=True,
                                           num_warps=4, num_stages=1))),
        ("w8a8 gemv PDL_CHAIN", pdl_on(w8a8_call(dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4,
                                                      num_stages=1, PDL=True, PDL_CHAIN=True)))),
        ("w8a8 gemm_q", lambda seed, off: w8a8.w8a8_gemm_q_triton(
            torch.randint(-127, 128, (5 * 64 + off,), dtype=torch.int8)[off:].view(5, 64), torch.rand(5, 1),
            *w8(seed, 48, 64), config=tl_dot)),
        ("mixed all-FP16", lambda seed, off: mixed.mixed_linear_triton(
            xs(seed, 5, 64, off), *w8(seed, 48, 64), None, mixed.CTRL_FORCE_FP16, None, None, config=tl_dot)),
        ("wna16 mma", wna16_call(dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=1, num_warps=4, num_stages=2))),
        ("wna16 gemv_h2", wna16_call(dict(BACKEND="gemv_h2", BLOCK_N=32, UNROLL=1, SPLIT_K=2, num_warps=4,
                                          num_stages=1))),
        ("wna16 gemv_h2 packed PDL", pdl_on(wna16_call(dict(BACKEND="gemv_h2", BLOCK_N=32, UNROLL=1, SPLIT_K=2,
                                                            num_warps=4, num_stages=1, PACKED_X=True, PDL=True)))),
        ("add_rmsnorm", lambda seed, off: fused.add_rmsnorm(xs(seed, 4, 96, off), xs(seed + 1, 4, 96, 0),
                                                            torch.rand(96).half(), 1e-5)),
        ("silu_mul", lambda seed, off: fused.silu_mul(xs(seed, 3, 2 * 80, off), 80)),
        ("rope_store", rope),
        ("decode_attention", attn),
        ("fwht", lambda seed, off: hadamard.fwht_pow2_triton(xs(seed, 6, 64, off, torch.float32), 0.125)),
        ("row_histogram", hist),
    ]


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_cached_launch_passes_what_an_ordinary_launch_binds(rec, case):
    name, call = _cases()[case]
    call(1, 0)  # first call: ordinary launches, compiled kernels cached
    n_ord = len(rec.ordinary)
    assert n_ord >= 1 and not rec.cached
    call(2, 0)  # fresh tensors of the same classes: every launch cached, CHECK_LAUNCH checks each
    assert len(rec.ordinary) == n_ord, f"{name}: a launch missed the cache"
    fast = list(rec.cached)
    assert len(fast) == n_ord
    # the same call again with the cache emptied: what the ordinary launches bind for these inputs
    rec.ordinary.clear()
    _common._FAST.clear()
    call(2, 0)
    # tensors the wrapper allocates per call differ: compare the parameters it did not allocate
    for (kn, grid, got), (kn2, grid2, want) in zip(fast, rec.ordinary):
        assert kn == kn2 and tuple(grid) == tuple(grid2[:len(grid)])
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            fresh = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() != b.data_ptr()
            if fresh:  # a per-call allocation (an output): same kind of tensor
                assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), (name, kn, i)
            else:
                assert _same(a, b), (name, kn, i, a, b)


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_unaligned_input_gets_its_own_kernel(rec, case):
    """x starting 2 elements (2 to 8 bytes) into its storage is another specialization: the launch that reads it
    must not reuse the aligned kernel (it goes the ordinary way)."""
    name, call = _cases()[case]
    call(1, 0)
    n_ord = len(rec.ordinary)
    call(2, 2)
    assert len(rec.ordinary) > n_ord, f"{name}: an unaligned input reused a kernel compiled for aligned ones"


def test_check_launch_catches_a_key_that_misses_an_argument(rec):
    """The self-check fails when key_args leave out an argument whose class changed."""
    from quantkit.kernels import act_quant

    lk = act_quant.act_quant_kernel
    x = torch.randn(4, 64).half()
    q, s = torch.empty(4, 64, dtype=torch.int8), torch.empty(4, 1)
    const = dict(EPS_C=1e-8, QMAX=127.0, STATIC=False, BLOCK_K=64, ONE_PASS=True, TRIGGER=False, WAIT=False,
                 num_warps=1)
    _common.fast_launch(lk, (4,), (x, q, s, s, 64, 64, 64), const, "k", (x,))
    q2 = torch.empty(4 * 64 + 1, dtype=torch.int8)[1:].view(4, 64)  # unaligned, but not in key_args
    with pytest.raises(AssertionError, match="key_args miss"):
        _common.fast_launch(lk, (4,), (x, q2, s, s, 64, 64, 64), const, "k", (x,))
    with pytest.raises(AssertionError, match="ckey does not identify"):
        _common.fast_launch(lk, (4,), (x, q, s, s, 64, 64, 64), dict(const, QMAX=7.0), "k", (x,))


def test_spec_key_matches_arg_class():
    """spec_key tells apart exactly what arg_class tells apart (on the argument kinds launches pass)."""
    t = torch.empty(40)
    vals = [t, t[1:], t.half(), t[4:], 1, 16, 17, 0, 2**31, -(2**31) - 1, 32, None, True, False, 1.5, 2.0]
    for a in vals:
        for b in vals:
            same_class = _common.arg_class(a) == _common.arg_class(b) and type(a) is type(b)
            assert (_common.spec_key((a,)) == _common.spec_key((b,))) == same_class, (a, b)


def test_interpret_mode_follows_the_environment(monkeypatch):
    """``interpret_mode`` reads os.environ's own store (a launch asks it several times): it still follows every
    change made through os.environ, including setting, changing and removing the variable, and a replaced
    os.environ."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _common.interpret_mode() is False
    for value, want in [("1", True), ("0", False), ("yes", True), ("off", False), ("TRUE", True)]:
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _common.interpret_mode() is want, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _common.interpret_mode() is False
    import os

    monkeypatch.setattr(os, "environ", {"TRITON_INTERPRET": "1"})  # not CPython's _Environ: the plain read
    assert _common.interpret_mode() is True
    os.environ["TRITON_INTERPRET"] = "0"
    assert _common.interpret_mode() is False


# ------------------------------------------------------------------ the lean launch: the C launch below the launcher

class CLaunch:
    """Stands in for Triton's compiled C launch (a callable with no Python code object): records its arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _triton_36_launcher():
    """The installed Triton's ``CudaLauncher`` where it is 3.6's (``PYTHONPATH=.dev/tri36``, the GPU image)."""
    try:
        from triton.backends.nvidia import driver

        return driver.CudaLauncher if getattr(driver, "_BASE_ARGS_FORMAT", None) == _common.BASE_ARGS_FORMAT else None
    except Exception:
        return None


TRITON_36_LAUNCHER = _triton_36_launcher()  # read before any test patches the driver module


def launcher_36(scratch: int = 0):
    """Triton 3.6's ``CudaLauncher`` around a ``CLaunch``: the installed Triton's own class where it is 3.6's, else a
    replica of its ``__call__``."""
    if TRITON_36_LAUNCHER is not None:
        lr = object.__new__(TRITON_36_LAUNCHER)
    else:
        class Replica:
            def __call__(self, gx, gy, gz, stream, function, *args):
                assert not self.global_scratch_size and not self.profile_scratch_size
                self.launch(gx, gy, gz, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None,
                            *args)

        lr = Replica()
    lr.launch, lr.num_ctas = CLaunch(), 1
    lr.global_scratch_size, lr.global_scratch_align, lr.profile_scratch_size, lr.profile_scratch_align = scratch, 1, 0, 1
    lr.launch_cooperative_grid, lr.launch_pdl = False, True
    return lr


@pytest.fixture
def lean(rec, monkeypatch):
    """``rec`` whose compiled kernels launch through a Triton 3.6 ``CudaLauncher`` (``launcher_36``); every tensor a
    launch passes counts as a CUDA tensor, so the lean launch passes addresses."""
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT", _common.BASE_ARGS_FORMAT, raising=False)
    ordinary = rec.getitem

    def getitem(lk, grid):
        launch = ordinary(lk, grid)

        def run(*args, **consts):
            k = launch(*args, **consts)
            return types.SimpleNamespace(function=k.function, packed_metadata=(4, 1, 0), run=launcher_36())

        return run

    monkeypatch.setattr(_common.LazyKernel, "__getitem__", lambda lk, grid: getitem(lk, grid))
    real = _common.pointer_args

    def as_cuda(args):  # the launch's tensors as CUDA tensors for ``pointer_args`` alone (the wrappers stay on CPU)
        rec.converted.append(tuple(args))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
            return real(args)

    rec.converted = []  # the arguments each lean launch converted, in launch order
    monkeypatch.setattr(_common, "pointer_args", as_cuda)
    prev = _common.set_lean_launch(True)
    yield rec
    _common.set_lean_launch(prev)


def _c_calls():
    """Every C launch's arguments, in launch order."""
    return sorted((c for k in _common._FAST.values() for c in k[0].run.launch.calls), key=lambda c: c[-1])


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_lean_launch_passes_what_the_launcher_passes(lean, case):
    """A cached launch's C launch gets, through the lean launch, what it gets through Triton's launcher, every
    tensor as its address; with the lean launch off it goes through the launcher again."""
    name, call = _cases()[case]
    order = [0]

    def numbered(*args):  # each C launch's arguments, the launch's number last (its order across kernels)
        order[0] += 1
        return (*args, order[0])

    call(1, 0)  # ordinary launches: each kernel's launcher cached with it
    assert _FAST_lean_entries() and not _c_calls() and not lean.converted
    for ent in _common._FAST.values():
        c = ent[0].run.launch
        c.__class__ = type("Numbered", (CLaunch,), {"__call__": lambda self, *a: self.calls.append(numbered(*a))})
    call(2, 0)
    got, converted = _c_calls(), list(lean.converted)
    assert len(got) == len(converted) >= 1, name  # every launch went through its C launch, converted
    for ent in _common._FAST.values():
        ent[0].run.launch.calls.clear()
    _common.set_lean_launch(False)
    call(2, 0)  # fresh inputs of the same kinds through Triton's launcher (``run_compiled``)
    want = _c_calls()
    assert len(want) == len(got) and len(lean.converted) == len(converted), name  # nothing converted now
    for g, w, args in zip(got, want, converted):
        assert len(g) == len(w) and g[:13] == w[:13], name  # grid, stream, function, options, metadata, hooks
        for i, (a, b) in enumerate(zip(g[13:-1], w[13:-1])):
            if isinstance(b, torch.Tensor):  # the address of the tensor the lean launch was given there
                t = args[i]
                assert type(a) is int and a == t.data_ptr(), (name, i)
                assert (t.dtype, t.shape, t.stride()) == (b.dtype, b.shape, b.stride()), (name, i)
            else:
                assert a == b and type(a) is type(b), (name, i, a, b)


def _FAST_lean_entries() -> bool:
    return bool(_common._FAST) and all(ent[3] is not None for ent in _common._FAST.values())


def test_lean_launch_only_below_the_launcher_it_knows(monkeypatch):
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT", _common.BASE_ARGS_FORMAT, raising=False)
    k = types.SimpleNamespace(function=7, packed_metadata=(4, 1, 0), run=launcher_36())
    c, head = _common.c_launch_of(k)
    assert c is k.run.launch and head == (7, False, True, None, None, (4, 1, 0), None, None, None)
    assert _common.c_launch_of(types.SimpleNamespace(function=7, packed_metadata=(4, 1, 0),
                                                     run=launcher_36(scratch=64))) is None  # scratch per launch
    wrapped = types.SimpleNamespace(function=7, packed_metadata=(4, 1, 0), run=launcher_36())
    wrapped.run.launch = lambda *a: None  # a Python wrapper around the C launch (host TMA descriptors)
    assert _common.c_launch_of(wrapped) is None
    assert _common.c_launch_of(types.SimpleNamespace(function=7, packed_metadata=None, run=lambda *a: None)) is None
    monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT", "iiiKKppOOOOO", raising=False)  # another C launch's arguments
    assert _common.c_launch_of(k) is None


def test_pointer_args_only_for_cuda_tensors(monkeypatch):
    t, u = torch.randn(8), torch.randn(8)[2:]
    args = (t, 5, None, 1.5, u, True)
    assert _common.pointer_args(args) == list(args)  # CPU tensors stay: Triton's launcher rejects them itself
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda s: True))
    got = _common.pointer_args(args)
    assert got == [t.data_ptr(), 5, None, 1.5, u.data_ptr(), True] and type(got[0]) is int


def test_bound_driver_reads_the_device_without_torchs_lazy_init_check():
    got = _common._bound_driver(types.SimpleNamespace(get_current_device=torch.cuda.current_device,
                                                      get_current_stream=max))
    if hasattr(torch._C, "_cuda_getDevice"):
        assert got.get_current_device is torch._C._cuda_getDevice
    else:
        assert got.get_current_device is torch.cuda.current_device
    assert got.get_current_stream is max
    other = _common._bound_driver(types.SimpleNamespace(get_current_device=min, get_current_stream=max))
    assert other.get_current_device is min  # another driver's getter is kept

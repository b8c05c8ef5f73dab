"""The host TMA descriptor memo (``_gluon.memo_tensordesc_arg``): a hit only where every input of the encoding is
the same, and the same result a fresh encoding gives.  The GPU suite runs every Gluon kernel with it on."""

import pytest
import torch

from quantkit.kernels import _gluon


class Desc:
    """What Triton 3.6's ``make_tensordesc_arg`` reads of a host descriptor."""

    def __init__(self, t, padding="zero"):
        self.base = t
        self.shape = list(t.shape)
        self.strides = list(t.stride())
        self.padding = padding


def meta(block=(64, 128), swizzle=128):
    return {"swizzle": swizzle, "elem_size": 2, "elem_type": 6, "block_size": list(block), "fp4_padded": False}


@pytest.fixture
def encode():
    calls = []

    def enc(arg, metadata):  # stands in for the driver's encoding: a fresh object each call, built from its inputs
        calls.append(1)
        return [object(), arg.base.data_ptr(), *arg.shape, *arg.strides, arg.padding,
                None if metadata is None else tuple(metadata["block_size"])]

    enc.calls = calls
    _gluon._TMA_MEMO.clear()
    prev = _gluon.set_tma_memo(True)
    yield enc
    _gluon.set_tma_memo(prev)
    _gluon._TMA_MEMO.clear()


def test_memo_hits_only_on_equal_inputs(encode):
    memo = _gluon.memo_tensordesc_arg(encode)
    w = torch.randn(256, 512, dtype=torch.float16)
    m = meta()
    first = memo(Desc(w), m)
    assert memo(Desc(w), m) is first and len(encode.calls) == 1  # same tensor, new descriptor object: a hit
    assert memo(Desc(w), meta()) is first and len(encode.calls) == 1  # an equal metadata dict: a hit
    others = [
        memo(Desc(w[:128]), m),  # shape
        memo(Desc(w[:, :256]), m),  # shape (the stride kept)
        memo(Desc(w.t().contiguous().t()), m),  # strides (and address)
        memo(Desc(w[1:]), m),  # address
        memo(Desc(w, padding="nan"), m),  # padding
        memo(Desc(w), meta(block=(128, 128))),  # box
        memo(Desc(w), meta(swizzle=64)),  # swizzle
    ]
    assert len(encode.calls) == 8 and all(o is not first for o in others)
    assert len({id(o) for o in others}) == len(others)
    for o, fresh in zip(others, [encode(Desc(w[:128]), m), encode(Desc(w[:, :256]), m)]):
        assert o[1:] == fresh[1:]  # what the encoding returns for those inputs


def test_memo_off_and_unencoded_pass_through(encode):
    memo = _gluon.memo_tensordesc_arg(encode)
    w = torch.randn(64, 64, dtype=torch.float16)
    a, b = memo(Desc(w), None), memo(Desc(w), None)  # no metadata: pointer + sizes, nothing to memoise
    assert a is not b and len(encode.calls) == 2
    _gluon.set_tma_memo(False)
    a, b = memo(Desc(w), meta()), memo(Desc(w), meta())
    assert a is not b and len(encode.calls) == 4 and not _gluon._TMA_MEMO


def test_install_only_on_the_known_encoding(monkeypatch):
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    import inspect

    fn = driver.make_tensordesc_arg
    known = list(inspect.signature(getattr(fn, "memo_of", fn)).parameters) == ["arg", "metadata"]
    monkeypatch.setattr(driver, "make_tensordesc_arg", getattr(fn, "memo_of", fn))
    assert _gluon.install_tma_memo() is known
    assert (getattr(driver.make_tensordesc_arg, "memo_of", None) is not None) is known
    assert _gluon.install_tma_memo() is known  # a second install keeps the one memo
    assert getattr(getattr(driver.make_tensordesc_arg, "memo_of", None), "memo_of", None) is None

    def three(arg, metadata, _):  # a later Triton's encoding, which reads more than the memo's key covers
        return [arg, metadata]

    monkeypatch.setattr(driver, "make_tensordesc_arg", three)
    assert _gluon.install_tma_memo() is False and driver.make_tensordesc_arg is three


# ---------------------------------------------------------------- RawLaunch: the C launch below Triton 3.6's wrapper

BASE = 13  # the C launch's leading arguments (grid, stream, function, options, scratch, metadata, hooks)


def enc(arg, metadata):  # an encoding whose result shows what it was built from (a fresh list each call)
    return [("map", arg.base.data_ptr(), tuple(metadata["block_size"])), *arg.shape, *arg.strides]


def wrap_like_triton_36(launcher, tensordesc_indices, tensordesc_meta):
    """Triton 3.6's descriptor wrapper as the tests need it: its closure's names, the encoding looked up per call.
    Where the installed Triton has that very wrapper, the real one is used instead (``triton_wrapper``)."""

    def inner(*args):
        final = list(args[:BASE])
        n = 0
        for i, a in enumerate(args[BASE:]):
            if i in tensordesc_indices:
                final.extend(_encoding[0](a, tensordesc_meta[n]))
                n += 1
            else:
                final.append(a)
        return launcher(*final)

    return inner


_encoding = [enc]


def triton_wrapper(monkeypatch):
    """The installed Triton's own wrapper where it is 3.6's (``PYTHONPATH=.dev/tri36``, the GPU image), its
    encoding replaced by ``enc``; else None."""
    try:
        from triton.backends.nvidia import driver
    except Exception:
        return None
    if getattr(driver, "wrap_handle_tensordesc", None) is None or not hasattr(driver, "_BASE_ARGS_FORMAT_LEN"):
        return None
    monkeypatch.setattr(driver, "make_tensordesc_arg", enc)
    if _gluon._triton_encoding() is None:
        return None
    return lambda launcher, idx, metas: driver.wrap_handle_tensordesc(
        launcher, {i: ("tensordesc<fp16[64, 128]>" if i in idx else "i32") for i in range(4)}, metas)


class FakeLauncher:
    """Triton 3.6's ``CudaLauncher``: its ``__call__`` passes the scratch buffers and options to ``launch``."""

    def __init__(self, wrap, scratch=0, n_desc=2, metas="default"):
        self.calls = []
        self.metas = [meta(), meta(block=(32, 128))][:n_desc] if metas == "default" else metas
        self.launch = wrap(lambda *a: self.calls.append(a), set(range(n_desc)), self.metas)
        self.global_scratch_size, self.profile_scratch_size, self.num_ctas = scratch, 0, 1
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def __call__(self, gx, gy, gz, stream, function, *args):
        self.launch(gx, gy, gz, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None, *args)


@pytest.fixture(params=["replica", "triton"])
def wrap(request, monkeypatch):
    monkeypatch.setattr(_gluon, "_triton_encoding", lambda: _encoding[0])
    if request.param == "triton":
        w = triton_wrapper(monkeypatch)
        if w is None:
            pytest.skip("the installed Triton's launcher is not 3.6's")
        monkeypatch.setattr(_gluon, "_triton_encoding", lambda: enc)
        return w
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT", _gluon._common.BASE_ARGS_FORMAT, raising=False)  # 3.6's C launch
    return wrap_like_triton_36


@pytest.fixture
def driver_stub(monkeypatch):
    import types

    monkeypatch.setattr(_gluon._common, "_driver", types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda d: 777))
    _gluon._TMA_MEMO.clear()
    prev = _gluon.set_tma_memo(True)
    yield
    _gluon.set_tma_memo(prev)
    _gluon._TMA_MEMO.clear()


def compiled(launcher):
    import types

    return types.SimpleNamespace(run=launcher, function=4242, packed_metadata=(4, 1, 1))


@pytest.mark.parametrize("lean", [False, True])
def test_raw_launch_passes_what_the_wrapper_passes(wrap, driver_stub, monkeypatch, lean):
    """The C launch gets the same arguments from ``RawLaunch`` as from Triton's launcher on ``HostDesc``s (the
    cached path before it), on the first call (memo misses) and the next (hits), and for new tensors; with the lean
    launch (``_common.LEAN_LAUNCH``) a CUDA tensor argument as its address."""
    launcher = FakeLauncher(wrap)
    k = compiled(launcher)
    raw = _gluon.RawLaunch.of(k, 2)
    assert raw is not None
    monkeypatch.setattr(_gluon._common, "LEAN_LAUNCH", lean)
    real = _gluon._common.pointer_args

    def as_cuda(a):  # the arguments as CUDA tensors for ``pointer_args`` alone
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
            return real(a)

    monkeypatch.setattr(_gluon._common, "pointer_args", as_cuda)
    w, x = torch.randn(128, 256, dtype=torch.float16), torch.randn(64, 256, dtype=torch.float16)
    args = (torch.randn(3), 17, 5, True)
    for tensors, grid in [((w, x), (8,)), ((w, x), (8, 2)), ((w[:64], x[1:]), (3, 1, 2))]:
        raw(grid, tensors, args)
        g = (*grid, 1, 1)[:3]
        launcher(*g, 777, k.function, k.packed_metadata, None, None, None,
                 *[_gluon.HostDesc(t) for t in tensors], *(as_cuda(args) if lean else args))
        got, want = launcher.calls[-2], launcher.calls[-1]
        assert len(got) == len(want) and all(a is b or a == b for a, b in zip(got, want))
        assert (type(got[-4]) is int) is lean and got[-3:] == (17, 5, True)
        assert got[BASE] == ("map", tensors[0].data_ptr(), (64, 128)) and got[BASE + 5] == (
            "map", tensors[1].data_ptr(), (32, 128))
    assert len(_gluon._TMA_MEMO) == 4  # two descriptors of two tensor pairs: the repeat call hit


def test_raw_launch_only_where_it_knows_the_launcher(wrap, driver_stub, monkeypatch):
    k = compiled(FakeLauncher(wrap))
    assert _gluon.RawLaunch.of(k, 1) is None  # two descriptors where the caller has one
    assert _gluon.RawLaunch.of(compiled(FakeLauncher(wrap, scratch=64)), 2) is None  # scratch memory per launch
    assert _gluon.RawLaunch.of(compiled(FakeLauncher(wrap, metas=[None, None])), 2) is None  # not encoded
    other = compiled(FakeLauncher(wrap))
    other.run.launch = lambda *a: None  # not the wrapper it knows
    assert _gluon.RawLaunch.of(other, 2) is None
    assert _gluon.RawLaunch.of(k, 2) is not None
    from triton.backends.nvidia import driver

    monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT", "iiiKKppOOOOO", raising=False)  # another C launch's arguments
    assert _gluon.RawLaunch.of(k, 2) is None
    monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT", _gluon._common.BASE_ARGS_FORMAT, raising=False)
    monkeypatch.setattr(_gluon, "_triton_encoding", lambda: None)  # another Triton's encoding
    assert _gluon.RawLaunch.of(k, 2) is None


def test_direct_launch_takes_the_raw_launch_and_falls_back(wrap, driver_stub, monkeypatch):
    """``DirectLaunch`` launches a remembered kernel through its ``RawLaunch``; with the memo off through
    ``run_compiled``; after a failed launch through the JIT from then on."""
    monkeypatch.setattr(_gluon._common, "fast_ready", lambda: True)
    monkeypatch.setattr(_gluon._common, "bind_driver", lambda k: True)
    launcher = FakeLauncher(wrap)
    k = compiled(launcher)
    monkeypatch.setattr(_gluon._common, "run_compiled", lambda kk, grid, args: launcher.calls.append(("compiled",)))
    d = _gluon.DirectLaunch()
    w, x = torch.randn(128, 256, dtype=torch.float16), torch.randn(64, 256, dtype=torch.float16)
    jit = []
    d.launch(lambda: "key", (4,), (w, x), (1,), lambda: jit.append(1) or k)
    assert jit == [1] and d.compiled["key"][1] is not None
    d.launch(lambda: "key", (4,), (w, x), (1,), lambda: jit.append(1) or k)
    assert jit == [1] and launcher.calls[-1][:2] == (4, 1) and launcher.calls[-1][-1] == 1
    _gluon.set_tma_memo(False)
    d.launch(lambda: "key", (4,), (w, x), (1,), lambda: jit.append(1) or k)
    assert jit == [1] and launcher.calls[-1] == ("compiled",)
    _gluon.set_tma_memo(True)

    def broken(*a):
        raise TypeError("wants more")

    d.compiled["key"][1].c_launch = broken
    d.launch(lambda: "key", (4,), (w, x), (1,), lambda: jit.append(1) or k)
    assert jit == [1, 1] and d.compiled is None  # the JIT launched it, and launches from now on

"""Replayed launches (``quantkit.kernels._replay``) on CPU: Triton's compile-and-launch replaced by a recorder whose
compiled kernels launch through a stand-in for Triton 3.6's C launch (``test_fast_launch``'s ``lean`` fixture), so
a linear's call records its lean launches and a later call of the same kind sends them again.  What a replay sends
must be what the wrapper's own launches send for the same x and out; what it cannot repeat must not be replayed.
The GPU suite checks replays bit for bit on real launches (``tests/kernels/test_gpu.py``)."""

import pytest
import torch

import test_fast_launch as fl
from quantkit.kernels import _common, _replay, mixed, w8a8, wna16

rec, lean = fl.rec, fl.lean  # test_fast_launch's fixtures


@pytest.fixture
def rp(lean, monkeypatch):
    """``lean`` with replays on: every tensor counts as a CUDA one, launches are not self-checked."""
    monkeypatch.setattr(_replay, "_on_gpu", lambda t: True)
    monkeypatch.setattr(_common, "CHECK_LAUNCH", False)
    prev = _replay.set_replay(True)
    yield lean
    _replay.set_replay(prev)


def c_calls():
    """Every C launch's arguments so far, in launch order (``CLaunch`` numbers them), and forget them."""
    calls = []
    for ent in _common._FAST.values():
        calls += ent[0].run.launch.calls
        ent[0].run.launch.calls.clear()
    return [c[:-1] for c in sorted(calls, key=lambda c: c[-1])]


@pytest.fixture
def numbered(rp):
    """Each C launch numbered as it is made, across kernels."""
    order = [0]

    def call(self, *a):
        order[0] += 1
        self.calls.append((*a, order[0]))

    fl.CLaunch.__call__, prev = call, fl.CLaunch.__call__
    yield rp
    fl.CLaunch.__call__ = prev


def xs(seed, M, K, off=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M * K + off, generator=g).to(dtype)[off:].view(M, K)


def w4(N=64, K=256, zero=False):
    g = torch.Generator().manual_seed(7)
    z = torch.randint(-8, 8, (N, K // 128), generator=g, dtype=torch.int8) if zero else None
    return wna16.prepack_wna16(torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8),
                               torch.rand(N, K // 128, generator=g).half() + 0.01, z, 4)


def w8(N=48, K=64):
    g = torch.Generator().manual_seed(8)
    return w8a8.prepack_w8a8(torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8),
                             torch.rand(N, generator=g) * 0.01 + 1e-3)


TL_DOT = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)
GEMV8 = dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1)


def sites():
    """(name, weight, its stable tensors, M, call(x, out)): the wrappers as the public ops call them."""
    W4, W4z, W8 = w4(), w4(zero=True), w8()
    bias = torch.randn(48).half()

    def wna16_call(W, cfg):
        return lambda x, out: wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, W.N, W.K,
                                                        config=cfg, out=out)

    def w8a8_call(cfg, b=None):
        return lambda x, out: w8a8.w8a8_linear_triton(x, W8.w, W8.scale, b, config=cfg, out=out)

    h2 = dict(BACKEND="gemv_h2", BLOCK_N=32, UNROLL=1, SPLIT_K=2, num_warps=4, num_stages=1)
    return [
        ("wna16 gemv_h2", W4, (W4.qw, W4.scales), 1, wna16_call(W4, h2)),
        ("wna16 gemv_h2 packed x", W4, (W4.qw, W4.scales), 1, wna16_call(W4, dict(h2, PACKED_X=True))),
        ("wna16 mma, zero points", W4z, (W4z.qw, W4z.scales, W4z.zeros), 3,
         wna16_call(W4z, dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=2, num_warps=4, num_stages=2))),
        ("w8a8 two launches", W8, (W8.w, W8.scale), 5, w8a8_call(TL_DOT)),
        ("w8a8 two launches, bias", W8, (W8.w, W8.scale, bias), 5, w8a8_call(TL_DOT, bias)),
        ("w8a8 quant once", W8, (W8.w, W8.scale), 5, w8a8_call(dict(TL_DOT, QUANT_ONCE=True))),
        ("w8a8 gemv", W8, (W8.w, W8.scale), 1, w8a8_call(GEMV8)),
        ("w8a8 gemv fused", W8, (W8.w, W8.scale), 1, w8a8_call(dict(GEMV8, SPLIT_K=1, FUSE_QUANT=True))),
    ]


def mixed_call(W, w16, cfg):
    """A mixed call (row bits: a third tensor of its own per call) as the public op makes it."""
    return lambda x, out, rb: mixed.mixed_linear_triton(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, config=cfg,
                                                        out=out)


IDS = [s[0] for s in sites()]


@pytest.mark.parametrize("case", range(len(IDS)), ids=IDS)
def test_a_replay_sends_what_the_wrapper_sends(numbered, case):
    """A kind of call is recorded at its second call (here the first compiles, binding Triton's driver, the second
    runs the wrapper, the third is recorded), and replayed from then on: its C launches are the wrapper's own for
    the same x and out, for new x and out too (their addresses put in)."""
    name, W, stable, M, call = sites()[case]
    K = W.K
    N = W.N
    site = _replay.Site(stable)
    for i in range(3):
        x, out = xs(i, M, K), torch.empty(M, N, dtype=torch.float16)
        _replay.call(site, x, out, lambda: call(x, out))
    assert len(site.replays) == 1 and not site.seen, name  # recorded at the second call
    c_calls()
    for seed in (5, 6):  # new x and out each time
        x, out = xs(seed, M, K), torch.empty(M, N, dtype=torch.float16)
        n_ord = len(numbered.ordinary)
        assert _replay.call(site, x, out, lambda: pytest.fail("the wrapper ran")) is out
        replayed = c_calls()
        _replay.set_replay(False)
        call(x, out)  # the wrapper's lean launches for the same x and out
        _replay.set_replay(True)
        assert replayed == c_calls() and replayed, name
        assert len(numbered.ordinary) == n_ord


def test_a_new_kind_of_call_is_recorded_anew(rp):
    W = w8()
    site = _replay.Site((W.w, W.scale))
    call = lambda x, out: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=TL_DOT, out=out)  # noqa: E731
    def run(x):
        out = torch.empty(x.shape[0], 48, dtype=torch.float16)
        _replay.call(site, x, out, lambda: call(x, out))

    for x in [xs(1, 5, 64)] * 3 + [xs(3, 4, 64)] * 2 + [xs(5, 5, 64, off=2)]:
        run(x)
    # M = 5 aligned (compiled, run, recorded), M = 4 (a new plan: run, recorded), M = 5 on an x 4 bytes off
    # alignment (another kind, seen once)
    assert sorted(k[0][0] for k in site.replays) == [4, 5] and list(site.seen.values()) == [1]
    _common.bump_generation()  # a switch turned: a new kind of call, recorded at its second call
    for _ in range(2):
        run(xs(6, 5, 64))
    assert len(site.replays) == 3
    big = xs(0, 300, 64), torch.empty(300, 48, dtype=torch.float16)
    assert _replay.call(site, *big, lambda: "wrapper") == "wrapper"
    assert len(site.replays) == 3 and len(site.seen) == 1  # beyond MAX_M rows: the wrapper, nothing counted


def test_no_replay_where_the_call_computes_with_torch(rp):
    """The dequantize-then-matmul W4A16 path runs torch.mm: its launches alone are not the call."""
    W = w4()
    site = _replay.Site((W.qw, W.scales))
    ran = []

    def call(x, out):
        ran.append(1)
        return wna16.wna16_linear_triton(x, W.qw, W.scales, None, None, 4, W.group_size, W.N, W.K,
                                         config=dict(BACKEND="dequant"), out=out)

    for i in range(5):
        x, out = xs(i, 3, 256), torch.empty(3, 64, dtype=torch.float16)
        _replay.call(site, x, out, lambda: call(x, out))
    assert not site.replays and len(ran) == 5 and sum(site.seen.values()) == _replay.MAX_TRIES + 1
    # a call whose launches could be replayed, but which also computes with torch (here: fills its output first)
    W8 = w8()
    site = _replay.Site((W8.w, W8.scale))
    for i in range(4):
        x, out = xs(i, 5, 64), torch.empty(5, 48, dtype=torch.float16)
        _replay.call(site, x, out, lambda: (out.fill_(0), w8a8.w8a8_linear_triton(x, W8.w, W8.scale, config=TL_DOT,
                                                                                   out=out))[1])
    assert not site.replays and sum(site.seen.values()) == _replay.MAX_TRIES + 1


def test_no_replay_where_a_launch_takes_a_tensor_of_its_own(rp):
    """A tensor that is neither x's, out's, a bound weight's nor a cached buffer (here the weight's scales, left
    out of the site) has an address a replay cannot know."""
    W = w8()
    site = _replay.Site((W.w,))
    for i in range(4):
        x, out = xs(i, 5, 64), torch.empty(5, 48, dtype=torch.float16)
        _replay.call(site, x, out, lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=TL_DOT, out=out))
    assert not site.replays


def test_no_replay_when_off_or_checking(rp, monkeypatch):
    W = w8()
    site = _replay.Site((W.w, W.scale))
    run = lambda x, out: _replay.call(site, x, out, lambda: w8a8.w8a8_linear_triton(  # noqa: E731
        x, W.w, W.scale, config=TL_DOT, out=out))
    _replay.set_replay(False)
    for i in range(3):
        run(xs(i, 5, 64), torch.empty(5, 48, dtype=torch.float16))
    assert not site.replays and not site.seen
    _replay.set_replay(True)
    monkeypatch.setattr(_common, "CHECK_LAUNCH", True)
    for i in range(3):
        run(xs(i, 5, 64), torch.empty(5, 48, dtype=torch.float16))
    assert not site.replays and not site.seen


def test_sites_follow_their_weights_tensors():
    import gc
    import weakref

    W = w8()
    a = _replay.site_of(W, "w8a8_linear", W.w, W.scale, None)
    assert _replay.site_of(W, "w8a8_linear", W.w, W.scale, None) is a and not hasattr(W, "_replay_site")  # beside W
    m = _replay.site_of(W, "mixed_linear", W.w, W.scale, None, None)  # another op on the same weight: its own site
    assert m is not a and _replay.site_of(W, "w8a8_linear", W.w, W.scale, None) is a
    b = _replay.site_of(W, "w8a8_linear", W.w, W.scale, torch.zeros(48))  # another bias
    assert b is not a and _replay.site_of(W, "w8a8_linear", W.w, W.scale, None) is not b
    W.scale = W.scale.clone()  # the weight's tensors replaced: a new site
    c = _replay.site_of(W, "w8a8_linear", W.w, W.scale, None)
    assert c.stable[1] is W.scale and _replay.site_of(W, "w8a8_linear", W.w, W.scale, None) is c
    scale = weakref.ref(W.scale)
    n = len(_replay._SITES)
    del W, c
    gc.collect()
    assert len(_replay._SITES) == n - 2 and scale() is None  # dropped with its weight: nothing kept alive


def test_the_public_ops_go_through_the_replay(rp, monkeypatch):
    """``wna16_linear`` and ``w8a8_linear`` (their eager path, what the runtime calls) record and replay."""
    monkeypatch.setattr(wna16, "eager_cuda", lambda x: True)
    monkeypatch.setattr(w8a8, "eager_cuda", lambda x: True)
    monkeypatch.setattr(w8a8, "_pick", lambda x, M, N, K, config, mixed=False: dict(TL_DOT))
    W4, W8 = w4(), w8()
    for i in range(3):
        wna16.wna16_linear(xs(i, 1, 256), W4)
        w8a8.w8a8_linear(xs(i, 5, 64), W8)
    assert len(_replay.site_of(W4, "wna16_linear", W4.qw, W4.scales, W4.zeros, None).replays) == 1
    assert len(_replay.site_of(W8, "w8a8_linear", W8.w, W8.scale, None).replays) == 1


class FakeRaw:
    """A Gluon kernel's ``RawLaunch``: C launch, leading arguments, each descriptor expanded to (map, shape,
    strides)."""

    def __init__(self, c):
        self.c_launch, self.head = c, ("fn", False, True, None, None, "meta", None, None, None)

    def expand(self, tensors):
        out = []
        for t in tensors:
            out += [("map", t.data_ptr(), tuple(t.shape)), *t.shape, *t.stride()]
        return out


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_gluon_launch_replays_with_its_descriptors(dynamic, monkeypatch):
    """A recorded RawLaunch: constant descriptors encoded once, a descriptor of x or out encoded per call; the
    plain arguments' addresses as for any launch."""
    monkeypatch.setattr(_replay, "_on_gpu", lambda t: True)
    c = fl.CLaunch()
    raw = FakeRaw(c)
    W = torch.randn(64, 32).half()
    site = _replay.Site((W,))
    ws = _common.cached_buffer(torch.device("cpu"), torch.float32, 100, tag="test_replay")

    def launch(x, out):  # what RawLaunch.__call__ sends (the lean launch's addresses)
        tensors = (x, W) if dynamic else (W,)
        args = (out, ws, 7, x.shape[0])
        return tensors, args, [5, 1, 1, 99, *raw.head, *raw.expand(tensors), out.data_ptr(), ws.data_ptr(), 7,
                               x.shape[0]]

    x0, out0 = xs(1, 4, 32), torch.empty(4, 64).half()
    tensors, args, _ = launch(x0, out0)
    rp = _replay.Replay.of([("raw", raw, (5,), tensors, args)], site, (x0, out0))
    assert rp is not None
    monkeypatch.setattr(_common, "current_stream", lambda: 99)
    for seed in (2, 3):
        x, out = xs(seed, 4, 32), torch.empty(4, 64).half()
        rp.run((x, out))
        assert list(c.calls[-1]) == launch(x, out)[2]
    view = x0[1:]  # a descriptor of a view of x: its offset is not x's
    assert _replay.Replay.of([("raw", raw, (5,), (view, W), args)], site, (x0, out0)) is None
    assert _replay.Replay.of([("raw", raw, (5,), tensors, args)], site, (x0, x0[:2])) is None  # out in x's storage


def test_one_recording_at_a_time(rp):
    """While another thread records (the lock held), a call runs the wrapper and records nothing: launches of two
    threads must not mix in one recording."""
    W = w8()
    site = _replay.Site((W.w, W.scale))

    def run(seed):
        x, out = xs(seed, 5, 64), torch.empty(5, 48, dtype=torch.float16)
        _replay.call(site, x, out, lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=TL_DOT, out=out))

    with _replay._RECORDING_LOCK:
        for i in range(2 + _replay.MAX_TRIES):
            run(i)
        assert not site.replays and _common._RECORDING is None
    run(9)  # (the calls above tried nothing: this one may still record)
    assert len(site.replays) == 1


@pytest.mark.parametrize("cfg", [TL_DOT, GEMV8], ids=["tl.dot", "gemv"])
def test_a_mixed_call_replays_with_its_row_bits(numbered, cfg):
    """Mixed calls: the row bits are the call's own too (their address put in per call, their layout in the kind),
    and the control word is in the kind."""
    W, w16 = w8(), torch.randn(48, 64).half()
    M = 5 if cfg is TL_DOT else 1
    call = mixed_call(W, w16, cfg)
    site = _replay.Site((W.w, W.scale, w16))

    def run(seed, rb, tag=mixed.CTRL_ROW_BITS):
        x, out = xs(seed, M, 64), torch.empty(M, 48, dtype=torch.float16)
        return x, out, _replay.call(site, x, out, lambda: call(x, out, rb), (rb,), tag)

    for i in range(3):
        run(i, (torch.arange(M) % 2).to(torch.uint8))
    assert len(site.replays) == 1
    c_calls()
    rb = (torch.arange(M) % 2 == 0).to(torch.uint8)  # new row bits, new x and out
    x, out, y = run(7, rb)
    replayed = c_calls()
    assert y is out and replayed
    _replay.set_replay(False)
    call(x, out, rb)
    _replay.set_replay(True)
    assert replayed == c_calls()
    assert not site.seen
    run(8, rb, tag=mixed.CTRL_ROW_BITS | 1 << 40)  # another control word: another kind, seen once (not replayed)
    assert len(site.replays) == 1 and list(site.seen.values()) == [1]
    run(9, torch.ones(M + 1, dtype=torch.uint8)[1:])  # row bits one byte off alignment: another kind too
    assert len(site.seen) == 2


def test_the_mixed_public_op_goes_through_the_replay(rp, monkeypatch):
    monkeypatch.setattr(mixed, "eager_cuda", lambda x: True)
    monkeypatch.setattr(w8a8, "_pick", lambda x, M, N, K, config, mixed=False: dict(TL_DOT))
    W, w16 = w8(), torch.randn(48, 64).half()
    for i in range(3):
        mixed.mixed_linear(xs(i, 5, 64), W, w16, mixed.CTRL_ROW_BITS, torch.ones(5, dtype=torch.uint8))
    assert len(_replay.site_of(W, "mixed_linear", W.w, W.scale, w16, None).replays) == 1

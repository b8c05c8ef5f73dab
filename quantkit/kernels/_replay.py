"""Replayed launches: a linear's call (weights bound, x and out per call) repeated as the C launches it made.

An eager GEMM call at small M is bound by the host: the wrapper's Python (plan lookups, specialization keys, buffer
lookups, argument tuples) runs before each of its one or two launches, and on an H100 host that took 25-100 us a
call against cuBLAS's 15-30 (BENCHMARKS.md, issue 19).  But for one linear and one kind of call (M, x's and out's
dtype, strides and alignment, where it runs) every argument of every launch is the same each time except the
addresses of x and out.  So the first call of each kind runs the wrapper with its launches recorded (``_common``'s
lean launches and ``_gluon.RawLaunch``es: the C launch each called, with what), and later calls of that kind send
the same C launches again with x's and out's addresses put in: no wrapper Python at all.

A recording becomes a replay only where that is exact:
- every launch of the call was a lean launch (a launch through Triton's JIT, its launcher or one of torch's ops
  that computes, rather than viewing or allocating, cannot be repeated from its arguments: torch's are seen by a
  dispatch mode while recording);
- every tensor a launch was given lies in x's storage, out's, the bound weights' or ``_common``'s cached buffers
  (grow-only, never freed: ``_RETIRED``), so its address is x's or out's plus a fixed offset, or a constant;
- a host TMA descriptor's tensor is x or out itself (its descriptor encoded again per call through the memo) or
  one of those constant ones (its descriptor encoded once).
Else the call keeps running the wrapper (after ``MAX_TRIES`` attempts without asking again).  A kind is recorded
at its second call (the first often compiles, and a prompt length may not come again), and only up to ``MAX_M``
rows.

What else could change a call's launches is in the kind's key: the device and whether its stream is being
captured into a CUDA graph (the EAGER configs), the runtime's PDL chain (its CHAINED configs and programmatic
launches), and ``_common.GENERATION``, which the lean-launch and TMA-memo switches and a ``ConfigCache.set`` bump.
Replays are off in the interpreter, with a launch hook installed (a profiler's), and under
``_common.CHECK_LAUNCH``; QUANTKIT_REPLAY=0 (or ``set_replay``) turns them off.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _common

ON = _common.env_flag("QUANTKIT_REPLAY", True)
# Ms a call is replayed at: where the host's time counts (decode batches, short prompts); a longer prompt's launches
# run for milliseconds, and recording each new length (a dispatch mode, every tensor's storage looked up) would cost
# more than a replay saves
MAX_M = 256
MAX_TRIES = 3  # recordings a kind of call may fail before its site stops asking (a first call compiles: not one)
MAX_KINDS = 64  # replays kept a site: past it the oldest goes


def set_replay(on: bool) -> bool:
    """Turn replays on or off; returns the previous setting."""
    global ON
    prev, ON = ON, on
    return prev


if torch.version.cuda is not None:  # torch's own query, without torch.cuda's Python around it (asked every call)
    _stream_capturing = torch._C._cuda_isCurrentStreamCapturing
else:  # a build without CUDA (its name is a stub there): nothing captures
    def _stream_capturing() -> bool:
        return False


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


class Site:
    """One call site's replays: a linear with its weights (``stable``: the tensors a replay may take as constant
    addresses, bias and FP16 copies included) bound."""

    __slots__ = ("stable", "ids", "replays", "seen")

    def __init__(self, stable: tuple):
        self.stable = tuple(t for t in stable if t is not None)
        # which objects it was made for (None too): held in ``stable``, their ids are theirs while the site lives
        self.ids = tuple(map(id, stable))
        self.replays: dict = {}  # kind -> Replay
        self.seen: dict = {}  # kind -> its calls not replayed (the first runs the wrapper, later ones record)


_SITES: dict = {}  # (id(owner), op) -> (a weak reference to the owner, its Site): dropped with the owner


def site_of(owner, op: str, *stable) -> Site:
    """``owner``'s site (a weight object's) for public op ``op`` and these tensors, made anew where they are not the
    objects it was made for (a weight whose tensors were replaced, another bias).  One per op, so a weight that two
    ops call (plain W8A8 and mixed) keeps both.  Kept beside the owner, not on it, and only while it lives."""
    key = (id(owner), op)
    ent = _SITES.get(key)
    if ent is not None and ent[0]() is owner and ent[1].ids == tuple(map(id, stable)):
        return ent[1]
    site = Site(stable)

    def drop(ref, key=key):
        if _SITES.get(key, (None,))[0] is ref:
            del _SITES[key]

    try:
        _SITES[key] = (weakref.ref(owner, drop), site)
    except TypeError:  # an owner without weak references: a site per call, never replayed
        pass
    return site


def linear(owner, op: str, stable: tuple, x: torch.Tensor, n_out: int, fn: Callable[[torch.Tensor], torch.Tensor],
           more: tuple = (), tag=None) -> torch.Tensor:
    """A public op's eager call: its output (x's rows, ``n_out`` columns, x's dtype) allocated, then ``fn(out)``
    (the wrapper) or its replay, at ``owner``'s site for ``op`` (``site_of``) with weights ``stable``."""
    out = torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
    return call(site_of(owner, op, *stable), x, out, lambda: fn(out), more, tag)


def _kind_of(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15)


def call(site: Site, x: torch.Tensor, out: torch.Tensor, fn: Callable[[], torch.Tensor], more: tuple = (),
         tag=None) -> torch.Tensor:
    """``fn()`` (the wrapper, writing ``out`` from ``x`` and the other per-call tensors ``more``, None for one
    absent), or its replay for this kind of call; ``tag``: whatever else of the call picks its launches (a mixed
    call's control word)."""
    if not ON or x.shape[0] > MAX_M or _common.CHECK_LAUNCH or not _on_gpu(x) or not _common.fast_ready():
        return fn()
    kind = (x.shape, x.stride(), x.dtype, x.data_ptr() & 15, out.shape, out.stride(), out.dtype, out.data_ptr() & 15,
            _common.current_device(), _stream_capturing(), _common._in_runtime_chain, _common.CHAIN_PDL,
            _common.CHAINED_CONFIGS, _common.GENERATION, tag)
    if more:
        kind += tuple(map(_kind_of, more))
    rp = site.replays.get(kind)
    if rp is not None:
        rp.run((x, out, *more) if more else (x, out))
        return out
    n = site.seen.get(kind, 0)
    if n > MAX_TRIES:
        return fn()
    if n == 0:  # a kind seen once is not recorded: it may not come again (and its first call usually compiles)
        if len(site.seen) >= 4 * MAX_KINDS:
            site.seen.clear()
        site.seen[kind] = 1
        return fn()
    if not _RECORDING_LOCK.acquire(blocking=False):  # another thread is recording: one recording at a time
        return fn()
    try:
        y, rp = _record(site, (x, out, *more), fn)
    finally:
        _RECORDING_LOCK.release()
    site.seen[kind] = n + 1
    if rp is not None:
        if len(site.replays) >= MAX_KINDS:
            del site.replays[next(iter(site.replays))]
        site.replays[kind] = rp
        del site.seen[kind]
    return y


# torch ops a recorded call may run: views and metadata (their tensors' addresses are then checked like any
# other), allocations (a launch given one is refused: its address is not x's, out's or a constant's)
_VIEWS = {"view", "_unsafe_view", "slice", "select", "alias", "as_strided", "t", "transpose", "permute", "unsqueeze",
          "squeeze", "expand", "detach", "narrow", "split", "split_with_sizes", "unbind", "reshape", "empty",
          "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh"}


def _computes(func) -> bool:
    return func.overloadpacket.__name__ not in _VIEWS


class _Watch(TorchDispatchMode):
    """While recording: notes a torch op that computes (a replay of the launches alone would leave it out)."""

    def __init__(self):
        super().__init__()
        self.computed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _computes(func):
            self.computed.append(str(func))
        return func(*args, **(kwargs or {}))


_RECORDING_LOCK = threading.Lock()


def _record(site: Site, tensors: tuple, fn) -> tuple[torch.Tensor, Optional["Replay"]]:
    """Run ``fn`` with its launches recorded (holding ``_RECORDING_LOCK``): (its result, the replay, or None where
    it cannot be one).  ``tensors``: the call's own (x, out, then the others, None for one absent)."""
    rec: list = []
    _common._RECORDING = (threading.get_ident(), rec)
    try:
        with _Watch() as watch:
            y = fn()
    finally:
        _common._RECORDING = None
    if watch.computed or y is not tensors[1] or not rec or any(r is None for r in rec):
        return y, None
    return y, Replay.of(rec, site, tensors)


class _Addresses:
    """Where a recorded call's tensors lie: in one of the call's own tensors' storages (x's, out's, ...), or in a
    constant one (the bound weights', the cached buffers')."""

    def __init__(self, site: Site, tensors: tuple):
        self.tensors = tensors
        self.own = [None if t is None else t.untyped_storage().data_ptr() for t in tensors]
        self.const = {t.untyped_storage().data_ptr() for t in site.stable}
        self.const.update(b.untyped_storage().data_ptr() for b in (*_common._BUFS.values(), *_common._RETIRED))

    def distinct(self) -> bool:
        """No two of the call's own tensors share a storage (their offsets would tie a replay to one layout), and
        none is a constant's."""
        own = [s for s in self.own if s is not None]
        return len(set(own)) == len(own) and not self.const.intersection(own)

    def of(self, t: torch.Tensor):
        """(which of the call's tensors, offset from its data pointer) for a tensor in the storage of one of them,
        its address for a constant one, else None."""
        if not _on_gpu(t):
            return None
        s = t.untyped_storage().data_ptr()
        if s in self.own:
            i = self.own.index(s)
            return (i, t.data_ptr() - self.tensors[i].data_ptr())
        return t.data_ptr() if s in self.const else None

    def place(self, t: torch.Tensor):
        """A Gluon descriptor's tensor: the index of the call's own tensor it is, itself where it is a constant's,
        else None (a view of one of the call's tensors: its descriptor would need its offset)."""
        for i, own in enumerate(self.tensors):
            if t is own:
                return i
        return t if isinstance(self.of(t), int) else None


class _Launch:
    """One recorded C launch: its full argument list (the stream's slot and the call's own tensors' addresses
    filled per call: ``slots``, (index, which tensor, offset)), and, for a Gluon launch on a descriptor of one of
    them, the descriptors to encode again per call (``descs``: its RawLaunch and tensors, the call's own as their
    index), spliced in at ``at``."""

    __slots__ = ("c", "args", "slots", "descs", "at")

    def __init__(self, c, args: list, slots: tuple, descs=None, at: int = 0):
        self.c, self.args, self.slots, self.descs, self.at = c, args, slots, descs, at

    def __call__(self, stream: int, ptrs: list, tensors: tuple) -> None:
        a = self.args.copy()
        a[3] = stream
        if self.descs is not None:
            raw, places = self.descs
            a[self.at:self.at] = raw.expand(tuple(tensors[p] if type(p) is int else p for p in places))
        for i, which, off in self.slots:
            a[i] = ptrs[which] + off
        self.c(*a)


class Replay:
    """A kind of call's launches, in order."""

    __slots__ = ("launches",)

    def __init__(self, launches: list):
        self.launches = launches

    @classmethod
    def of(cls, rec: list, site: Site, tensors: tuple) -> Optional["Replay"]:
        where = _Addresses(site, tensors)
        if not where.distinct():
            return None
        launches = []
        for r in rec:
            launch = _launch_of(r, where)
            if launch is None:
                return None
            launches.append(launch)
        return cls(launches)

    def run(self, tensors: tuple) -> None:
        """Send the launches for the call's own tensors (x, out, then the others, as recorded)."""
        stream = _common.current_stream()
        ptrs = [t.data_ptr() for t in tensors] if len(tensors) == 2 else [
            None if t is None else t.data_ptr() for t in tensors]
        for launch in self.launches:
            launch(stream, ptrs, tensors)


def _resolve(args, where: _Addresses, base: int):
    """(the arguments with each tensor's address, the slots of the call's own tensors) or None where a tensor is
    neither theirs nor a constant; ``base``: the first argument's index in the C launch."""
    resolved, slots = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            w = where.of(a)
            if w is None:
                return None
            if isinstance(w, tuple):
                slots.append((base + i, *w))
                w = 0
            a = w
        resolved.append(a)
    return resolved, tuple(slots)


def _launch_of(r: tuple, where: _Addresses) -> Optional[_Launch]:
    head_len = 4  # grid x, y, z, stream
    if r[0] == "plain":  # fast_launch's lean launch
        _, c, grid, head, args, tail = r
        got = _resolve(args, where, head_len + len(head))
        if got is None:
            return None
        return _Launch(c, [*_common.grid3(grid), None, *head, *got[0], *tail], got[1])
    _, raw, grid, tensors, args = r  # a Gluon kernel's RawLaunch
    places = [where.place(t) for t in tensors]
    if any(p is None for p in places):
        return None
    at = head_len + len(raw.head)
    expanded = raw.expand(tuple(tensors))  # (its length is the same for any tensors of these ranks)
    got = _resolve(args, where, at + len(expanded))
    if got is None:
        return None
    if all(isinstance(p, torch.Tensor) for p in places):  # every descriptor constant: encoded once
        return _Launch(raw.c_launch, [*_common.grid3(grid), None, *raw.head, *expanded, *got[0]], got[1])
    return _Launch(raw.c_launch, [*_common.grid3(grid), None, *raw.head, *got[0]], got[1], (raw, tuple(places)), at)

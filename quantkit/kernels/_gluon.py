"""What the Gluon kernels (``w8a8_gluon``, ``wna16_gluon``) share: Gluon's Hopper API behind one import guard,
host TMA descriptors, and the cached direct launch.

Gluon is experimental and has no interpreter: a Triton without it, a GPU other than sm_90, or operands TMA cannot
describe make a kernel's ``applies`` false and its caller runs a ``tl.dot`` kernel.  Names move between releases
(3.6's ``tma.async_copy_global_to_shared`` is ``tma.async_load`` later, its ``gl.thread_barrier`` ``gl.barrier``):
both spellings are accepted.
"""

from __future__ import annotations

import functools

import torch

from quantkit.kernels import _common

try:  # Gluon's Hopper API (Triton >= 3.5); absent: no Gluon backend is ever selected
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.language._core import builtin as gluon_builtin
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # 3.6 / later
    GLUON_ERROR = None
except Exception as e:  # ImportError, or an API this file does not know
    GLUON_ERROR = f"{type(e).__name__}: {e}"
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_init = warpgroup_mma_wait = None
    TensorDescriptor = tma_load = tma_store = cta_barrier = gluon_builtin = None

if GLUON_ERROR is None:

    @gluon.constexpr_function
    def mma_warps(rows, num_warps):
        """warps_per_cta of a wgmma accumulator with ``rows`` rows: from the [4, 1] warpgroup atom, doubled along
        the rows while they have 16-row slices left, else along the columns."""
        w = [4, 1]
        while w[0] * w[1] != num_warps:
            if rows > 16 * w[0]:
                w[0] *= 2
            else:
                w[1] *= 2
        return w

    @gluon_builtin
    def reinterpret(smem, dtype, shape, layout, _semantic=None):
        """The same shared bytes as another dtype / shape / layout (a builtin, so the layout stays a compile-time
        value; 3.6 spells the method ``_reinterpret``, later Tritons ``reinterpret``)."""
        method = getattr(smem, "reinterpret", None) or smem._reinterpret
        return method(dtype, shape, layout, _semantic=_semantic)

    @gluon.jit
    def grid_dep_wait():
        """``_common.grid_dep_wait`` for Gluon kernels: wait for the launch before this programmatic one (PDL) to
        finish and its writes to be visible."""
        gl.inline_asm_elementwise(_common.GRID_DEP_WAIT_ASM, "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def grid_dep_launch_dependents():
        """``_common.grid_dep_launch_dependents`` for Gluon kernels: let the next launch, if programmatic, start now
        (once every CTA of this one has said so or ended) instead of when this one ends."""
        gl.inline_asm_elementwise(_common.GRID_DEP_LAUNCH_ASM, "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def clock():
        """This SM's cycle counter (``%clock64``): durations inside a CTA (the SMs' counters are not aligned)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def global_ns():
        """The GPU's nanosecond timer (``%globaltimer``): one clock for every SM, coarser than ``clock``."""
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def ready_barriers(STAGES: gl.constexpr):
        """One "TMA landed" mbarrier per ring slot, initialised and fenced for the async proxy."""
        return counted_barriers(STAGES, 1)

    @gluon.jit
    def counted_barriers(STAGES: gl.constexpr, COUNT: gl.constexpr):
        """One mbarrier per ring slot whose phase completes after COUNT arrivals (a slot "empty" barrier that
        several partitions release), initialised and fenced for the async proxy."""
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=COUNT)
        fence_async_shared()
        return bars

    @gluon.jit
    def splitk_sum(acc, ws_ptr, lock_ptr, tile, pid_k, offs, SPLIT_K: gl.constexpr, ELEMS: gl.constexpr):
        """``_common.splitk_sum``'s protocol for Gluon: this split's partial ``acc`` goes to its workspace slot
        (``offs``: each element's place in a tile of ELEMS), and the last split of ``tile`` to arrive sums all of
        them and resets the tile's counter.  Returns (total, last): the total is meaningful only where last."""
        slots = ws_ptr + tile.to(gl.int64) * (SPLIT_K * ELEMS) + offs
        gl.store(slots + pid_k * ELEMS, acc)
        cta_barrier()  # every thread's partial is written before the counter moves
        last = gl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            acc = gl.load(slots)
            for sk in gl.static_range(1, SPLIT_K):
                acc += gl.load(slots + sk * ELEMS)
            gl.atomic_xchg(lock_ptr + tile, 0)
        return acc, last


# the warp-specialized kernels' register budget (two one-warpgroup MMA partitions and a one-warp loader, launched
# with num_warps 4): maxnreg a thread over their 12 warps (3 warpgroups: 168 x 384 threads fill the SM's 64K
# registers), shared by the worker MMA partition (WS_MMA_REGS), the loader (WS_LOAD_REGS) and the default MMA
# partition (the rest: 168 * 3 - 232 - 40 = 232)
WS_MAXNREG, WS_MMA_REGS, WS_LOAD_REGS = 168, 232, 40
WS_LAUNCH = {"num_warps": 4, "maxnreg": WS_MAXNREG}  # their launch options (num_warps: the default partition)

# the shallowest ring the Gluon GEMMs run: each prefetches STAGES - 1 K tiles before its loop and keeps one wgmma in
# flight while it refills the slot the previous one read, so a one-slot ring waits on a load it never issued (a GPU
# hang): a config written for the tl.dot kernel with num_stages 1 runs that kernel instead
MIN_STAGES = 2


def ring_ok(cfg: dict) -> bool:
    return int(cfg["num_stages"]) >= MIN_STAGES


GL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int32: "int32", torch.int8: "int8"}


def is_sm90(index: int) -> bool:
    return _common.capability(index) == (9, 0)


def available(t: torch.Tensor) -> bool:
    """Gluon importable and ``t`` on an sm_90 GPU."""
    return GLUON_ERROR is None and t.is_cuda and is_sm90(t.get_device())


def aligned16(*ts: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


@functools.lru_cache(maxsize=None)
def nvmma_layout(block: tuple, dtype: str):
    """Gluon's default (largest swizzle) shared layout of a ``block`` tile (1-D or 2-D) of ``dtype`` (a
    ``GL_DTYPES`` name)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), getattr(gl, dtype))


def descriptor(t: torch.Tensor, block: list[int]):
    """Host TMA descriptor of ``t`` in [block] tiles (the default shared layout)."""
    return TensorDescriptor.from_tensor(t, block, nvmma_layout(tuple(block), GL_DTYPES[t.dtype]))


class HostDesc:
    """What a compiled kernel's launcher reads from a host ``TensorDescriptor`` (``base.data_ptr()``, ``shape``,
    ``strides``, ``padding``), taken from the tensor without ``from_tensor``'s checks and layout objects: a cached
    launch builds one per descriptor per call.  The block shape and layout are compiled into the kernel (they are
    part of its cache key), so these plain values are all a launch needs."""

    __slots__ = ("ptr", "shape", "strides")
    padding = "zero"
    round_f32_to_tf32 = False

    def __init__(self, t: torch.Tensor):
        self.ptr = t.data_ptr()
        self.shape = list(t.shape)
        self.strides = list(t.stride())

    @property
    def base(self):
        return self

    def data_ptr(self) -> int:
        return self.ptr


# Triton 3.6's launcher (the GPU image's) wraps its C launch in Python that encodes every host TMA descriptor again
# on each call (``make_tensordesc_arg``: Python, then the driver's cuTensorMapEncodeTiled), though a decode step's
# descriptors name the same weights and scratch buffers every time.  One memo holds the encoded descriptors, keyed by
# every value the encoding reads (box / swizzle / dtype metadata, base address, shape, strides, padding), so a hit is
# exactly what a fresh encoding would return: it cannot go stale, only miss.  Two paths use it: ``RawLaunch`` (a
# cached kernel's C launch called directly, the descriptors expanded from the memo) and, for the JIT's own launches,
# Triton's ``make_tensordesc_arg`` with the memo put in front (``install_tma_memo``).  QUANTKIT_TMA_MEMO=0 turns
# both off (``set_tma_memo``: the benchmarks' A/B); H100 host times: BENCHMARKS.md, session 52.
TMA_MEMO = _common.env_flag("QUANTKIT_TMA_MEMO", True)
_TMA_MEMO: dict = {}
_META_KEYS: dict = {}  # id(metadata dict) -> (the dict, its values as a key); holding the dict keeps its id its own


def set_tma_memo(on: bool) -> bool:
    """Turn the descriptor memo (and with it ``RawLaunch``, which reads it) on or off; returns the previous
    setting."""
    global TMA_MEMO
    prev, TMA_MEMO = TMA_MEMO, on
    _common.bump_generation()
    return prev


def _meta_key(meta: dict) -> tuple:
    ent = _META_KEYS.get(id(meta))
    if ent is None or ent[0] is not meta:
        ent = _common.remember(_META_KEYS, id(meta), (meta, tuple(sorted((k, repr(v)) for k, v in meta.items()))))
    return ent[1]


def _encoded(key: tuple, encode, arg, metadata):
    """The memo's entry for ``key`` = (metadata's key, base address, shape, strides, padding), encoding ``arg``
    with ``metadata`` on a miss."""
    hit = _TMA_MEMO.get(key)
    return hit if hit is not None else _common.remember(_TMA_MEMO, key, encode(arg, metadata))


def memo_tensordesc_arg(encode):
    """``encode`` (Triton's ``make_tensordesc_arg(arg, metadata)``) with its results memoised by value."""

    def make_tensordesc_arg(arg, metadata):
        if not TMA_MEMO or metadata is None:  # None: no encoding, the descriptor is passed as pointer + sizes
            return encode(arg, metadata)
        key = (_meta_key(metadata), arg.base.data_ptr(), tuple(arg.shape), tuple(arg.strides), arg.padding)
        return _encoded(key, encode, arg, metadata)

    make_tensordesc_arg.memo_of = encode
    return make_tensordesc_arg


def _triton_encoding():
    """Triton's own ``make_tensordesc_arg`` where it is the ``(arg, metadata)`` one of Triton 3.6, whose inputs the
    memo's key is known to cover (later ones read more of ``arg``: tf32 rounding, im2col strides) and whose
    launchers look it up at each call; else None."""
    import inspect

    try:
        from triton.backends.nvidia import driver

        fn = driver.make_tensordesc_arg
        fn = getattr(fn, "memo_of", fn)
        return fn if list(inspect.signature(fn).parameters) == ["arg", "metadata"] else None
    except Exception:
        return None


def install_tma_memo() -> bool:
    """Put the memo in front of Triton's ``make_tensordesc_arg`` (once); False where ``_triton_encoding`` is
    None."""
    try:
        from triton.backends.nvidia import driver

        if getattr(driver.make_tensordesc_arg, "memo_of", None) is not None:  # installed
            return True
    except Exception:
        return False
    fn = _triton_encoding()
    if fn is None:
        return False
    driver.make_tensordesc_arg = memo_tensordesc_arg(fn)
    return True


# the names Triton 3.6's descriptor wrapper closes over: the C launch, which parameters are descriptors, their metadata
_LAUNCH_FREEVARS = ("launcher", "tensordesc_indices", "tensordesc_meta")


class RawLaunch:
    """A compiled Gluon kernel's C launch, called with its leading descriptor arguments expanded from the memo:
    what Triton 3.6's ``CudaLauncher.__call__`` and its descriptor wrapper do, less their per-call Python (the
    wrapper's argument walk, an encoding per descriptor, the scratch checks).  ``of`` builds one only where the
    launcher is that wrapper around a C launch, every descriptor is encoded (has metadata) and leads the kernel's
    parameters, and the kernel needs no scratch memory; anything else keeps the ordinary path."""

    __slots__ = ("c_launch", "head", "descs", "encode")

    def __init__(self, c_launch, head: tuple, descs: tuple, encode):
        self.c_launch, self.head, self.descs, self.encode = c_launch, head, descs, encode

    @classmethod
    def of(cls, k, n_desc: int) -> "RawLaunch | None":
        encode = _triton_encoding()
        head = _common.c_launch_head(k)
        if encode is None or head is None:
            return None
        try:
            wrapper = k.run.launch
            cells = dict(zip(wrapper.__code__.co_freevars, (c.cell_contents for c in wrapper.__closure__ or ())))
            if any(n not in cells for n in _LAUNCH_FREEVARS):
                return None
            metas = cells["tensordesc_meta"]
            if (sorted(cells["tensordesc_indices"]) != list(range(n_desc)) or metas is None or len(metas) != n_desc
                    or any(m is None for m in metas)):
                return None
            return cls(cells["launcher"], head, tuple((m, _meta_key(m)) for m in metas), encode)
        except Exception:  # another Triton's internals
            return None

    def expand(self, tensors: tuple) -> list:
        """The descriptor arguments of ``tensors`` as the C launch takes them (each: its encoding, shape, strides)."""
        out = []
        for (meta, mkey), t in zip(self.descs, tensors):
            key = (mkey, t.data_ptr(), tuple(t.shape), t.stride(), HostDesc.padding)
            hit = _TMA_MEMO.get(key)  # a hit builds no HostDesc
            out += hit if hit is not None else _encoded(key, self.encode, HostDesc(t), meta)
        return out

    def __call__(self, grid, tensors: tuple, args: tuple) -> None:
        if _common._RECORDING is not None:
            _common.record(("raw", self, grid, tensors, args))
        self.c_launch(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,  # (grid3, inline)
                      _common.current_stream(), *self.head, *self.expand(tensors),
                      *(_common.pointer_args(args) if _common.LEAN_LAUNCH else args))


class DirectLaunch:
    """A Gluon kernel's compiled variants, launched directly once seen.  Gluon's JIT path (argument binding,
    descriptor type mangling, cache lookup) costs ~50 us of host time per call on an H100 host (BENCHMARKS.md);
    a cached kernel goes through its ``RawLaunch`` where it has one (and the memo is on), else through
    ``_common.run_compiled`` with ``HostDesc``s.  After one failed direct launch (a Triton whose launcher wants
    more than these give) the JIT path is used from then on."""

    def __init__(self):
        self.compiled: dict | None = {}  # key -> (compiled kernel, its RawLaunch or None)

    def run(self, key, grid, tensors: tuple, args: tuple) -> bool:
        """Launch the variant cached under ``key()`` (a callable: the key names the current device, known once
        Triton's driver is bound) with descriptors of ``tensors`` and then ``args`` (every other parameter,
        constexprs included, in order): False when there is none (the caller launches through the JIT and then
        calls :meth:`remember`)."""
        if self.compiled is None or not _common.fast_ready():
            return False
        ent = self.compiled.get(key())
        if ent is None:
            return False
        k, raw = ent
        try:
            if raw is not None and TMA_MEMO:
                raw(grid, tensors, args)
            else:
                _common.record(None)
                _common.run_compiled(k, grid, (*[HostDesc(t) for t in tensors], *args))
            return True
        except Exception:
            self.compiled = None
            return False

    def launch(self, key, grid, tensors: tuple, args: tuple, jit) -> None:
        """:meth:`run`, else ``jit()`` (the kernel launched through the JIT, on descriptors it builds; it returns
        the compiled kernel), which is then remembered under ``key()`` with ``len(tensors)`` descriptors."""
        if not self.run(key, grid, tensors, args):
            _common.record(None)
            if self.compiled is not None:  # a variant's first launch; once direct launches are off, every launch
                # takes this path and the memo is already in place (installed on an earlier first launch)
                install_tma_memo()
            self.remember(key, jit(), len(tensors))

    def remember(self, key, k, n_desc: int) -> None:
        """After a JIT launch returned compiled kernel ``k`` (its first ``n_desc`` parameters descriptors): cache it
        under ``key()``."""
        if self.compiled is not None and k is not None and _common.bind_driver(k):
            self.compiled[key()] = (k, RawLaunch.of(k, n_desc))


def compile_for_target(kernel, sig: dict, consts: dict, num_warps: int, cc: int = 90, **options):
    """Compile Gluon ``kernel`` for sm_``cc`` without a GPU (Triton's Gluon pipeline, LLVM and ptxas): the CPU
    suite's build checks and the probes.  sig: every parameter's type (constexprs as "constexpr"); options: more
    compile options (``maxnreg``)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    src = GluonASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton_compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, **options})


def mangle(desc) -> str:
    from triton.runtime.jit import mangle_type

    return mangle_type(desc)

"""Shared helpers for the Triton kernels: lazy Triton import, dispatch, kernel cache.

Dispatch rule (every public kernel entry point follows it):

* CUDA tensors                   -> the Triton kernel, compiled;
* CPU tensors, ``TRITON_INTERPRET=1`` -> the Triton kernel, run by Triton's interpreter;
* CPU tensors otherwise          -> the plain-torch ``*_ref`` (so the runtime works on CPU).

Triton decides "interpreted or compiled" when a function is *decorated* with ``triton.jit``
(it reads ``TRITON_INTERPRET`` at that moment).  To be independent of import order (another
module may import this package before a test sets the variable) the kernels are written as
plain Python functions and decorated lazily, at first launch, once per mode, by
:class:`LazyKernel`.  Code shared between kernels is written as :class:`JitHelper` functions
(plain Python too); a kernel's (or helper's) module-level references to them are re-bound to
their ``triton.jit`` versions for the same mode when the kernel is decorated.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Any, Callable, Optional

import torch

try:  # guarded: `import quantkit.kernels.*` must work without triton (torch references only)
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install

    class tl:  # type: ignore[no-redef]
        """Stand-in so kernel signatures (``X: tl.constexpr``) still parse without triton."""

        @staticmethod
        def constexpr(v=None):  # annotation, or a module-level constant ``tl.constexpr(42)``
            return v


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable: a flag on by default is off only when set to 0 / false / off / no, one off
    by default is on only when set to 1 / true / on / yes."""
    value = os.environ.get(name, "1" if default else "0").lower()
    return value not in ("0", "false", "off", "no") if default else value in ("1", "true", "on", "yes")


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value. Asked several times a launch, so read from
    ``os.environ``'s own store, which its writes (``monkeypatch.setenv`` too) update: one dict lookup, where the
    mapping's ``get`` encodes the key and decodes the value (0.08 against 0.86 us a call on a 2-core CPU)."""
    global _ENVIRON, _ENV_STORE, _INTERPRET_KEY
    if os.environ is not _ENVIRON:  # (re)bind: first call, or os.environ replaced
        _ENVIRON, _ENV_STORE = os.environ, getattr(os.environ, "_data", None)
        encode = getattr(os.environ, "encodekey", None)
        _INTERPRET_KEY = encode("TRITON_INTERPRET") if encode is not None else None
        _INTERPRET_BY_RAW.clear()
    if _ENV_STORE is None or _INTERPRET_KEY is None:  # not CPython's os.environ: the plain read
        return env_flag("TRITON_INTERPRET", False)
    raw = _ENV_STORE.get(_INTERPRET_KEY)
    on = _INTERPRET_BY_RAW.get(raw)
    if on is None:
        on = _INTERPRET_BY_RAW[raw] = env_flag("TRITON_INTERPRET", False)
    return on


_ENVIRON = None
_ENV_STORE = None
_INTERPRET_KEY = None
_INTERPRET_BY_RAW: dict = {}  # the variable's raw value (None: unset) -> interpret_mode()


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch here: a compiled kernel on an sm_90+ GPU may start while the launch before it
    finishes (``launch_pdl``), waiting in :func:`grid_dep_wait` for that launch's results. Off in the interpreter
    and before Hopper (the ``griddepcontrol`` instructions need sm_90)."""
    if device.type != "cuda" or interpret_mode():
        return False
    return capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def wants_pdl(cfg: dict, device: torch.device) -> bool:
    """``PDL`` (a config key of the two-launch forms, sm_90+): the consumer is launched programmatically, so it
    starts while the launch before it runs instead of after it ends (the gap between two launches, in a CUDA graph
    too)."""
    return bool(cfg.get("PDL", False)) and pdl_supported(device)


def pdl_chains(cfg: dict, pdl: bool) -> bool:
    """``PDL_CHAIN`` (a config key of the W8A8 GEMV and the TMA-fed W4A16 GEMV, with PDL): the GEMV lets the next
    launch start at once, and the call's own first launch (the quantization or the packing) is programmatic too,
    waiting on the GPU for the launch before it."""
    return pdl and bool(cfg.get("PDL_CHAIN", False))


def pdl_option(on: bool) -> dict:
    """The launch option of a programmatic launch (``launch_pdl``), or none."""
    return {"launch_pdl": True} if on else {}


# The runtime's decode steps chain their launches programmatically on sm_90+: its own launches (``kernels.fused``,
# decode attention) are launched with PDL, let the next launch start at once and wait for the launch before it
# (:func:`pdl_enter`), so a step's launches start while the one before runs instead of after it (H100, session 50:
# batch-1 decode 4.1% faster in W4A16, 3.4% in W8A8C8; batch 32 within 1%; bit for bit the plain launches' logits).
# Decode steps only (:func:`runtime_chain`): a prefill's launches are long, so the gaps are nothing to them, and
# chained the next launches' programs sit on the SMs while they run (session 50: W8A8C8 prefill of 512 tokens 20%
# slower with the chain). QUANTKIT_CHAIN_PDL=0, or CHAIN_PDL = False here, turns it off (benchmarks/runtime.py
# --chain-ab times both).
CHAIN_PDL = env_flag("QUANTKIT_CHAIN_PDL", True)
_in_runtime_chain = False  # inside runtime_chain()


@contextlib.contextmanager
def runtime_chain():
    """Context: a decode step of the runtime (its forward pass, eager or being captured into a graph), whose
    launches chain where :func:`chain_pdl` says. Nests."""
    global _in_runtime_chain
    was, _in_runtime_chain = _in_runtime_chain, True
    try:
        yield
    finally:
        _in_runtime_chain = was


def chain_pdl(device: torch.device) -> bool:
    """Whether a launch on ``device`` joins the runtime's programmatic chain: inside :func:`runtime_chain`, with
    :data:`CHAIN_PDL` on, on sm_90+. Asked on every fused launch, so whether the device supports it is kept per
    device."""
    if not (CHAIN_PDL and _in_runtime_chain):
        return False
    here = _PDL_HERE.get(device)
    if here is None:
        here = _PDL_HERE[device] = pdl_supported(device)
    return here


_PDL_HERE: dict = {}  # device -> pdl_supported(device)


# A config entry may carry a ``CHAINED`` config: the one its GEMM runs inside the runtime's chain
# (:func:`chain_pdl`). There the launch before a GEMM lets it start early, so a GEMV launched with PDL starts its
# weights' loads while that launch runs; behind a plain launch (a user's eager call, a torch op) the same config
# only costs (H100, session 50, 4096 x 4096 M = 1, the in-place half2 GEMV with PDL and PREFETCH 2: 8.0 us against
# the plain entry's 9.6 behind the runtime's norm, 9.3 against 8.6 behind a torch op). ``benchmarks/gemm.py
# --decode-parts`` times both and writes it; the runtime's A/B (``benchmarks/runtime.py --chain-ab``) has the
# last word (PDL_CHAIN twins, which let the next launch start too, won behind the norm and lost in the runtime).
CHAINED = "CHAINED"
# QUANTKIT_CHAINED_CONFIGS=0, or CHAINED_CONFIGS = False here, runs the plain entries inside the chain too
CHAINED_CONFIGS = env_flag("QUANTKIT_CHAINED_CONFIGS", True)


def use_chained_configs(device: torch.device) -> bool:
    """Whether a GEMM called now on ``device`` runs its entry's ``CHAINED`` config."""
    return CHAINED_CONFIGS and chain_pdl(device)


# ... and an ``EAGER`` config: the one it runs outside a CUDA-graph capture (a user's eager call, a decode loop
# without graphs). There the host's work for each launch lies between the GPU's kernels, so one launch (the
# activations quantized or packed inside the GEMM) can beat two that replay faster from a graph (H100, session 54:
# W8A8 M = 1 took 45-74 us of host time a call in two launches, cuBLAS 20-23 us in one).
# ``benchmarks/gemm.py --tune-eager`` ranks the one-launch forms by what such a call costs (the larger of its eager
# and host time) and writes the winner where it beats the plain entry there. Inside the runtime's chain an entry's
# CHAINED config wins over its EAGER one.
EAGER = "EAGER"
SUB_CONFIGS = (CHAINED, EAGER)


def plain_config(cfg: dict) -> dict:
    """``cfg`` without its sub-configs (what a call runs under a CUDA-graph capture outside the runtime's chain)."""
    return {k: v for k, v in cfg.items() if k not in SUB_CONFIGS}


def has_sub_configs(cfg: dict) -> bool:
    return any(sub in cfg for sub in SUB_CONFIGS)


def call_configs(cfg: dict, chained: bool) -> tuple[dict, Optional[dict]]:
    """The configs a call of entry ``cfg`` runs: (under a CUDA-graph capture, outside one; None: the same). Inside
    the runtime's chain (``chained``) its ``CHAINED`` config where it has one, else the plain entry and its
    ``EAGER`` config."""
    if not has_sub_configs(cfg):
        return cfg, None
    if chained and cfg.get(CHAINED):
        return dict(cfg[CHAINED]), None
    eager = cfg.get(EAGER)
    return plain_config(cfg), (dict(eager) if eager else None)


def capturing(x: torch.Tensor) -> bool:
    """Whether a launch for ``x`` now is recorded into a CUDA graph (asked only of entries with an EAGER config)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def first_waits(chain: bool, pdl: bool) -> bool:
    """Whether a two-launch GEMM's first launch (the activations' quantization or packing, whose consumer is
    launched with PDL when ``pdl``) is programmatic itself and waits on the GPU for the launch before it: with
    ``PDL_CHAIN`` (``chain``: the GEMV before it let it start), or inside the runtime's chain (:data:`CHAIN_PDL`
    in a :func:`runtime_chain`), where the launch before it lets it start early. Read per call, so toggling the
    chain needs no new plans."""
    return chain or (pdl and CHAIN_PDL and _in_runtime_chain)


def prefetch_steps(cfg: dict, pdl: bool) -> int:
    """``PREFETCH`` (a config key of the PDL GEMVs): K steps of weights asked of L2 before the wait for the launch
    before; 0 without PDL (nothing to overlap). A power of two (the prefetch's pointer tile is a Triton range)."""
    steps = int(cfg.get("PREFETCH", 0)) if pdl else 0
    if steps & (steps - 1):
        raise ValueError(f"PREFETCH must be a power of two, got {steps}")
    return steps


@functools.lru_cache(maxsize=None)
def capability(index: int) -> tuple:
    """CUDA device ``index``'s compute capability (cached: asked on every launch decision)."""
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def interpreter_usable() -> bool:
    """Whether Triton's interpreter can run kernels in this process.

    Triton decorates its own standard library (``tl.max``, ``tl.sum``, ...) when it is first
    imported; if that happened before ``TRITON_INTERPRET=1`` was set, those helpers are compiled
    ``JITFunction``s and interpreted kernels that call them fail.  (Tests then re-run the
    interpreter checks in a subprocess; the dispatcher falls back to the torch reference.)
    """
    if not (interpret_mode() and triton_available()):
        return False
    import triton.language as tl_

    return type(tl_.max).__name__ != "JITFunction"


_warned = False


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether to run the Triton kernel for these inputs (see module docstring)."""
    global _warned
    if not triton_available():
        return False
    if all(t.is_cuda for t in tensors if t is not None):
        return True
    if not interpret_mode():
        return False
    if interpreter_usable():
        return True
    if not _warned:
        import warnings

        warnings.warn("TRITON_INTERPRET=1 was set after triton was imported; using the torch references")
        _warned = True
    return False


def _rebind_helpers(fn: Callable[..., Any], mode: bool) -> Callable[..., Any]:
    """``fn`` with the :class:`JitHelper` globals it names replaced by their jitted versions (same mode)."""
    g = fn.__globals__
    repl = {n: g[n].jitted(mode) for n in fn.__code__.co_names if isinstance(g.get(n), JitHelper)}
    if not repl:
        return fn
    import types

    f2 = types.FunctionType(fn.__code__, {**g, **repl}, fn.__name__, fn.__defaults__, fn.__closure__)
    functools.update_wrapper(f2, fn)
    del f2.__wrapped__  # triton reads the source through __code__, not through the wrapper chain
    return f2


class JitHelper:
    """A function that kernels call (``@triton.jit`` when the calling kernel is decorated, per mode)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._jitted: dict[bool, Any] = {}
        functools.update_wrapper(self, fn)

    def jitted(self, mode: bool):
        k = self._jitted.get(mode)
        if k is None:
            import triton

            k = self._jitted[mode] = triton.jit(_rebind_helpers(self.fn, mode))
        return k


def jit_helper(fn: Callable[..., Any]) -> JitHelper:
    return JitHelper(fn)


class LazyKernel:
    """``triton.jit`` applied on first launch (per interpret/compiled mode).

    ``LazyKernel(fn)[grid](*args, **constexprs)`` behaves like ``triton.jit(fn)[grid](...)``.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._jitted: dict[bool, Any] = {}
        functools.update_wrapper(self, fn)

    def jitted(self):
        mode = interpret_mode()
        k = self._jitted.get(mode)
        if k is None:
            import triton

            k = self._jitted[mode] = triton.jit(_rebind_helpers(self.fn, mode))
        return k

    def __getitem__(self, grid):
        return self.jitted()[grid]

    def param_names(self) -> list:
        names = getattr(self, "_names", None)
        if names is None:
            import inspect

            names = self._names = list(inspect.signature(self.fn).parameters)
        return names


def build_for_target(fn, types: dict[str, str], consts: dict[str, Any], cc: int = 90, *, aligned=(),
                     **options):
    """Compile a ``triton.jit`` function (compiled mode: ``LazyKernel.jitted()`` with TRITON_INTERPRET unset) for
    NVIDIA compute capability `cc` with Triton's own compiler and ptxas: no GPU needed (the compile test, the
    static wgmma probe). types: argument -> Triton type, others "*fp32" for ``*_ptr`` names and "i32" otherwise;
    consts: the constexprs; aligned: arguments given the 16-byte divisibility a launch specialises on (without
    it the compiler assumes unaligned pointers and, e.g., does not pipeline 2-byte loads); options: num_warps,
    num_stages. Returns the CompiledKernel (``.asm`` per stage, ``.metadata.shared``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names and n not in consts}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


# the most shared memory one CTA may take on Hopper (sm_90: 228 KiB an SM, 1 KiB of it reserved per CTA); a
# kernel over it fails at launch, on the GPU only
HOPPER_SMEM_PER_BLOCK = 227 * 1024


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def m_bucket(m: int) -> int:
    """Bucket for the autotune cache: 1, 2, 4, 8, 16, 32, 64, 128, 256, ... (next power of 2)."""
    return next_pow2(max(int(m), 1))


@functools.lru_cache(maxsize=None)
def device_name(index: int | None = None) -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(index)


def gpu_key(t: torch.Tensor) -> str:
    """Short GPU family name used in the autotune cache ('H100', 'H200', ... or 'cpu')."""
    if not t.is_cuda:
        return "cpu"
    name = device_name(t.device.index)
    for fam in ("H200", "H100", "H800", "H20", "A100", "L40S", "L4"):
        if fam in name:
            return fam
    return name


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def load_tuned(kernel: str, directory: str = CONFIG_DIR) -> dict[tuple, dict]:
    """``{(gpu, m_bucket, N, K): config}`` for ``kernel`` from every ``<gpu>.json`` in ``directory``
    (data files keyed by GPU: a new GPU is a new file, written by ``benchmarks/gemm.py --tune``)."""
    import json

    table: dict[tuple, dict] = {}
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in names:
        if not name.endswith(".json"):
            continue
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            data = json.load(f)
        for e in data.get(kernel, []):
            table[(name[:-5], int(e["m"]), int(e["n"]), int(e["k"]))] = dict(e["config"])
    return table


_UNTUNED_WARNED: set[str] = set()  # GPUs already checked (the check runs once: some launches cache no config)


def warn_untuned(gpu: str, directory: str = CONFIG_DIR) -> None:
    """Once per GPU with no ``configs/<gpu>.json``: say that its GEMMs run the heuristic tile configs (files ship
    for the H200, and for the H100's large-M W8A8) and how to measure its own."""
    if gpu == "cpu" or gpu in _UNTUNED_WARNED:
        return
    _UNTUNED_WARNED.add(gpu)
    if os.path.exists(os.path.join(directory, f"{gpu}.json")):
        return
    logging.getLogger(__name__).warning(
        "no tuned GEMM configs for %s (quantkit/kernels/configs/%s.json): the kernels use heuristic tile sizes, "
        "which can be slower; `python benchmarks/gemm.py --tune --write-configs` measures this GPU's", gpu, gpu)


def write_tuned(gpu: str, kernel: str, entries: dict[tuple[int, int, int], dict], directory: str = CONFIG_DIR) -> str:
    """Merge measured ``{(m_bucket, N, K): config}`` of ``kernel`` into ``<directory>/<gpu>.json``
    (one entry per line, sorted, so a re-tune reads as a small diff); returns the file's path."""
    import json

    path = os.path.join(directory, f"{gpu}.json")
    data: dict = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    cur = {(int(e["m"]), int(e["n"]), int(e["k"])): e["config"] for e in data.get(kernel, [])}
    for key, cfg in entries.items():
        mnk, cfg = tuple(int(v) for v in key), dict(cfg)
        for sub in SUB_CONFIGS:  # a search ranks one kind of call: the entry's CHAINED config was measured in the
            kept = cur.get(mnk, {}).get(sub)  # runtime's chain (gemm.py --decode-parts), its EAGER one by eager
            if sub not in cfg:  # calls (gemm.py --tune-eager), and those searches decide them
                if kept is not None:
                    cfg[sub] = kept
            elif cfg[sub] is None:  # measured there: none is faster than the plain entry
                del cfg[sub]
        cur[mnk] = cfg
    data[kernel] = [{"m": m, "n": n, "k": k, "config": cur[(m, n, k)]} for (m, n, k) in sorted(cur)]
    lines = ["{"]
    items = list(data.items())
    for i, (key, val) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if isinstance(val, list):
            rows = ",\n".join("  " + json.dumps(e) for e in val)
            lines.append(f" {json.dumps(key)}: [\n{rows}\n ]{end}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(val)}{end}")
    lines.append("}")
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # then renamed: a tuner killed mid-write leaves the old file whole
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


NEAR_BUCKETS = 8  # how far (x M) a measured bucket may stand in for an unmeasured one (the shipped grid: 1..8192)


class ConfigCache:
    """Kernel-config cache keyed by (M bucket, N, K, GPU).

    ``defaults`` is a heuristic ``fn(M, N, K) -> dict``; the measured overrides, keyed
    ``(gpu, m_bucket, N, K)``, are ``kernel``'s entries in ``configs/<gpu>.json`` (read on first use)
    or an explicit ``table``; an entry whose ``gpu`` is ``"*"`` applies to every GPU.
    """

    def __init__(self, defaults: Callable[[int, int, int], dict], kernel: str | None = None,
                 table: dict | None = None):
        self.defaults = defaults
        self.kernel = kernel
        self._table: dict[tuple, dict] | None = dict(table) if table is not None else None
        self._near: dict[tuple, list[int]] = {}

    @property
    def table(self) -> dict[tuple, dict]:
        if self._table is None:
            self._table = load_tuned(self.kernel) if self.kernel else {}
        return self._table

    def get(self, M: int, N: int, K: int, gpu: str) -> dict:
        """The tuned config of M's bucket; else the tuned config of the nearest bucket measured for this
        (N, K, GPU) at most NEAR_BUCKETS x away: the next larger one (it covers M with masked rows), or the
        largest smaller one; else the heuristic. (A decode batch of 32 then runs the M=64 tuning, not the
        untuned default; but a GPU file tuned only at large M never hands its prefill tiles to decode.)"""
        mb = m_bucket(M)
        for key in ((gpu, mb, N, K), ("*", mb, N, K)):
            cfg = self.table.get(key)
            if cfg is not None:
                return dict(cfg)
        near = self._near.get((gpu, N, K))
        if near is None:
            near = self._near[(gpu, N, K)] = sorted(b for (g, b, n, k) in self.table if n == N and k == K and g in (gpu, "*"))
        up = [b for b in near if mb <= b <= mb * NEAR_BUCKETS]
        down = [b for b in near if mb > b >= mb // NEAR_BUCKETS]
        if up or down:
            b = up[0] if up else down[-1]
            cfg = self.table.get((gpu, b, N, K)) or self.table.get(("*", b, N, K))
            return dict(cfg)
        if self.kernel:
            warn_untuned(gpu)
        return dict(self.defaults(M, N, K))

    def set(self, M: int, N: int, K: int, gpu: str, cfg: dict) -> None:
        self.table[(gpu, m_bucket(M), N, K)] = dict(cfg)
        self._near.clear()
        bump_generation()


def round_half_away_ref(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (what the kernels do; torch.round ties to even)."""
    return torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))


_BUFS: dict = {}
# buffers a larger one replaced: kept alive, since a CUDA graph captured earlier (the runtime's decode graphs, a
# user's) still reads and writes them by address; freed, their memory could go to any later allocation.  Growth at
# least doubles, so what is kept stays below the current buffer's size.
_RETIRED: list = []


def cached_buffer(device, dtype, numel: int, zero: bool = False, tag: str = "") -> torch.Tensor:
    """A grow-only buffer per (device, dtype, zero, tag): no allocation per call once warm, and never freed
    (safe under CUDA-graph replay: see ``_RETIRED``).

    ``zero=True`` buffers are zero-initialised when (re)allocated; kernels that use them as
    counters reset what they used back to 0.  Not safe for two kernels that use the same
    buffer concurrently on different streams of one device."""
    key = (device.type, device.index, dtype, zero, tag)
    buf = _BUFS.get(key)
    if buf is None or buf.numel() < numel:
        n = max(int(numel), 4096, 2 * buf.numel() if buf is not None else 0)
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(n, dtype=dtype, device=device) if zero else torch.empty(n, dtype=dtype, device=device)
        _BUFS[key] = buf
    return buf


def splitk_buffers(device, tiles: int, split_k: int, tile_elems: int, elem_bytes: int):
    """(workspace, counters) for the in-kernel split-K reduction ("the last split to arrive sums").

    Both are cached per device (:func:`cached_buffer`): no allocation and no memset launch per
    call; each kernel resets the counters it used back to 0."""
    dt = torch.float32 if elem_bytes == 4 else torch.int32
    if split_k <= 1:
        return cached_buffer(device, dt, 1), cached_buffer(device, torch.int32, 1, zero=True)
    ws = cached_buffer(device, dt, tiles * split_k * tile_elems)
    return ws, cached_buffer(device, torch.int32, tiles, zero=True)


def splitk_for(programs: int, n_iters: int, target: int = 528, max_split: int = 16) -> int:
    """Split-K factor (power of 2) so that ``programs * split`` reaches ~``target`` programs
    (4 waves of 132 SMs) while every split keeps at least one K iteration."""
    s = 1
    while s < max_split and programs * s < target and s * 2 <= n_iters:
        s *= 2
    return s


# ----------------------------------------------------------------------------- fast launch
#
# ``JITFunction.run`` (triton >= 3.3) binds the arguments, computes the specialization key,
# looks the compiled kernel up and then calls
#     kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, launch_metadata,
#                enter_hook, exit_hook, *bound_args.values())
# which costs ~15-30 us of host time per call.  ``fast_launch`` keeps the compiled kernel per
# (kernel, constexprs/options, argument specialization class) and calls the launcher directly.
# The specialization class of an argument is what triton specializes on: a tensor's dtype and
# 16-byte alignment, an int's (== 1, % 16 == 0, fits int32) -- so a cached kernel is only reused
# for arguments the same compile would have accepted.  Any launch hook (profilers), the
# interpreter, or QUANTKIT_FAST_LAUNCH=0 takes the ordinary path.

_FAST: dict = {}
_FAST_ON = env_flag("QUANTKIT_FAST_LAUNCH", True)
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_driver = None  # (get_current_device, get_current_stream) as ``bind_driver`` binds them
_knobs = None

# The lean launch: a cached kernel's C launch called below Triton 3.6's ``CudaLauncher`` (``c_launch_of``), which
# skips that launcher's Python ``__call__`` (a frame and two scratch checks a launch), with every CUDA tensor
# argument passed as its address (``pointer_args``).  For an int the C launch takes the value as the pointer; for a
# tensor it calls ``data_ptr()`` and then cuPointerGetAttribute, a driver call per tensor argument (about 0.3 us each
# on a fast host: pytorch#180507; a W8A8 call at small M passes 14 tensors).  QUANTKIT_LEAN_LAUNCH=0 (or
# ``set_lean_launch``) turns it off: the benchmarks' A/B (``gemm.py --host-profile``).
LEAN_LAUNCH = env_flag("QUANTKIT_LEAN_LAUNCH", True)

# Recording for a replay (``_replay``): while ``_RECORDING`` holds (thread id, list), each lean launch of that thread
# appends what it launched (``record``) and any other launch None: a replay cannot repeat a launch it cannot see.
_RECORDING = None

# Bumped by every switch a replay's launches depend on beyond the call's own key (``set_lean_launch``, the TMA
# memo's, a ``ConfigCache.set``): replays recorded before it are not replayed after it.
GENERATION = 0


def record(entry) -> None:
    """Append ``entry`` (a lean launch's parts, or None) to this thread's recording, if one is on."""
    rec = _RECORDING
    if rec is not None and rec[0] == threading.get_ident():
        rec[1].append(entry)


def bump_generation() -> None:
    global GENERATION
    GENERATION += 1


# the C launch's leading arguments (Triton 3.6's ``_BASE_ARGS_FORMAT``): grid x, y, z, stream, function,
# cooperative grid, PDL, global and profile scratch, packed metadata, launch metadata, enter and exit hooks; then the
# kernel's arguments (each host TMA descriptor expanded)
BASE_ARGS_FORMAT = "iiiKKppOOOOOO"


FAST_STATS = [0, 0]  # [cached launches, ordinary launches] (diagnostics)


def _no_hooks() -> bool:
    """No launch hook installed (triton >= 3.5 keeps an empty ``HookChain`` there, not None)."""
    r = _knobs.runtime
    for h in (r.launch_enter_hook, r.launch_exit_hook):
        if h is not None and getattr(h, "calls", True):
            return False
    return True


def arg_class(a):
    """What Triton specializes a launch argument on (dtype and 16-byte alignment of a tensor, == 1 / % 16 /
    int32 range of an int): a compiled kernel serves every argument of the same class."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
    if isinstance(a, float):
        return float
    return type(a)


_Tensor = torch.Tensor
_I32 = 1 << 31


def spec_key(args) -> tuple:
    """:func:`arg_class` of every argument, as one flat tuple, in a third less host time (a plain tensor adds its
    dtype and alignment; an int one code of (== 1, % 16 == 0, int32 range); anything else its class in a 1-tuple,
    so no two argument kinds can yield equal entries)."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if type(a) is _Tensor else
                  (a == 1) | (not a & 15) << 1 | (-_I32 <= a < _I32) << 2 if type(a) is int else (arg_class(a),)
                  for a in args])


def current_device() -> int:
    """Triton's current CUDA device (a direct launch goes to its current stream)."""
    return _driver.get_current_device()


def current_stream() -> int:
    """The current stream of Triton's current device (where a direct launch goes)."""
    return _driver.get_current_stream(_driver.get_current_device())


def set_lean_launch(on: bool) -> bool:
    """Turn the lean launch (``LEAN_LAUNCH``) on or off; returns the previous setting."""
    global LEAN_LAUNCH
    prev, LEAN_LAUNCH = LEAN_LAUNCH, on
    bump_generation()
    return prev


def pointer_args(args) -> list:
    """``args`` with every CUDA tensor replaced by its address, for a C launch (``LEAN_LAUNCH``).  Any other tensor
    stays, so Triton's launcher still rejects it with its own error."""
    return [a.data_ptr() if type(a) is _Tensor and a.is_cuda else a for a in args]


def c_launch_head(k) -> tuple | None:
    """Compiled kernel ``k``'s C-launch arguments after the stream (function, cooperative grid, PDL, no scratch,
    packed metadata, no launch metadata, no hooks) where its launcher is Triton 3.6's ``CudaLauncher`` (the C
    launch's arguments as 3.6 lays them out), on one CTA per program and with no scratch memory, which that
    launcher's ``__call__`` would allocate per launch; else None."""
    try:
        from triton.backends.nvidia import driver

        launcher = k.run
        if (getattr(driver, "_BASE_ARGS_FORMAT", None) != BASE_ARGS_FORMAT or launcher.global_scratch_size
                or launcher.profile_scratch_size or getattr(launcher, "num_ctas", 1) != 1):
            return None
        return (k.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None, k.packed_metadata,
                None, None, None)
    except Exception:  # another Triton's internals
        return None


def c_launch_of(k) -> tuple | None:
    """(C launch, ``c_launch_head``) of compiled kernel ``k`` where its launcher calls the C launch as it is (no
    host TMA descriptor, so no Python wrapper around it: ``_gluon.RawLaunch`` handles those); else None."""
    head = c_launch_head(k)
    if head is None:
        return None
    launch = k.run.launch
    return None if hasattr(launch, "__code__") else (launch, head)  # a Python function: a wrapper


def fast_ready() -> bool:
    """A cached compiled kernel may be launched directly now: enabled, compiled mode, Triton's driver bound
    (after the first ordinary launch) and no launch hook installed."""
    return _FAST_ON and _driver is not None and not interpret_mode() and _no_hooks()


def grid3(grid) -> tuple:
    """A launch grid of one to three dimensions as the C launch's (x, y, z).  (The launches themselves spell it out
    inline: the helper costs 0.16 us a launch on this CPU, the host time they exist to save.)"""
    return grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1


def run_compiled(k, grid, args: tuple, dev: int | None = None) -> None:
    """Launch compiled kernel ``k`` on the current stream (of ``dev``, default Triton's current device) with every
    parameter in order (constexprs too, as ``JITFunction.run`` passes them); only when :func:`fast_ready`."""
    if dev is None:
        dev = current_device()
    k.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,  # (grid3, inline)
          _driver.get_current_stream(dev), k.function, k.packed_metadata, None, None, None, *args)


def _bound_driver(driver):
    """Triton's driver's current device and stream getters, the device one as torch's C call where it is
    ``torch.cuda.current_device`` (whose Python ``_lazy_init`` check, on every launch, has nothing left to do once a
    kernel ran: 1.2 us own of a 3.7 us call on an H100 host, session 54's host profile)."""
    import types

    get_device = driver.get_current_device
    if get_device is torch.cuda.current_device and hasattr(torch._C, "_cuda_getDevice"):
        get_device = torch._C._cuda_getDevice
    return types.SimpleNamespace(get_current_device=get_device, get_current_stream=driver.get_current_stream)


def bind_driver(k) -> bool:
    """After an ordinary launch returned compiled kernel ``k``: remember Triton's driver and knobs (what
    :func:`run_compiled` needs); False when ``k`` lacks the internals a direct launch uses."""
    global _driver, _knobs
    try:
        import triton
        from triton import knobs

        _knobs = knobs
        if _driver is None:
            _driver = _bound_driver(triton.runtime.driver.active)
        return hasattr(k, "packed_metadata") and hasattr(k, "function")
    except Exception:  # unknown triton internals: keep the ordinary path
        return False


# QUANTKIT_CHECK_LAUNCH=1: every cached launch re-derives the full specialization key and compares it with the
# one its kernel was compiled for (the check of the ``key_args`` contracts below; the GPU tests turn it on).
CHECK_LAUNCH = env_flag("QUANTKIT_CHECK_LAUNCH", False)


def fast_launch(lk: "LazyKernel", grid, args: tuple, consts: dict, ckey, key_args: tuple | None = None) -> None:
    """``lk[grid](*args, **consts)`` with the compiled-kernel lookup cached.

    ``args``: the runtime (non-constexpr) arguments, positionally, in the kernel's order (they
    must come before every constexpr parameter); ``consts``: constexprs + launch options;
    ``ckey``: a hashable that identifies ``consts`` (the caller's plan key).  ``key_args``: the
    arguments whose class ``ckey`` does not already fix (default: all of ``args``), e.g. leaving
    out the caller's own cached buffers (always 16-byte aligned, of one dtype): fewer arguments,
    less host time per call."""
    if not _FAST_ON or interpret_mode():
        if _RECORDING is not None:
            record(None)
        lk[grid](*args, **consts)
        return
    dev = _driver.get_current_device() if _driver is not None else None
    key = (id(lk), dev, ckey, spec_key(args if key_args is None else key_args))
    ent = _FAST.get(key)
    if ent is not None and _no_hooks():
        FAST_STATS[0] += 1
        k, tail, full, lean = ent
        if CHECK_LAUNCH:
            _check_cached(lk, args, consts, tail, full)
        if lean is not None and LEAN_LAUNCH:
            if _RECORDING is not None:
                record(("plain", lean[0], grid, lean[1], args, tail))
            lean[0](grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,  # (grid3, inline)
                    _driver.get_current_stream(dev), *lean[1], *pointer_args(args), *tail)
        else:
            if _RECORDING is not None:
                record(None)
            run_compiled(k, grid, (*args, *tail), dev)
        return
    FAST_STATS[1] += 1
    if _RECORDING is not None:
        record(None)
    k = lk[grid](*args, **consts)
    if k is None:
        return
    if hasattr(k, "result"):  # async compile mode
        k = k.result()
    if not bind_driver(k):
        return
    key = (key[0], _driver.get_current_device()) + key[2:]
    names = lk.param_names()
    # constexprs in parameter order
    _FAST[key] = (k, tuple(consts[n] for n in names[len(args):]), spec_key(args), c_launch_of(k))


def _check_cached(lk, args: tuple, consts: dict, tail: tuple, full: tuple) -> None:
    """CHECK_LAUNCH: the cached kernel is the one an ordinary launch of these arguments would pick (same argument
    classes, constexprs and options) and the direct launch passes every parameter once, in order."""
    names = lk.param_names()
    want = tuple(consts[n] for n in names[len(args):])
    if full != spec_key(args):
        raise AssertionError(f"fast_launch: {lk.__name__}'s cached kernel was compiled for other argument classes "
                             f"({full} != {spec_key(args)}): its key_args miss an argument")
    if want != tail or len(args) + len(tail) != len(names):
        raise AssertionError(f"fast_launch: {lk.__name__}'s cached constexprs {tail} != this call's {want}: its "
                             f"ckey does not identify its constexprs")


PLAN_LIMIT = 4096  # entries per launch-plan cache: keys hold M, one per prompt length in a server


def remember(cache: dict, key, value):
    """``cache[key] = value``, emptying ``cache`` first when it holds PLAN_LIMIT entries; returns ``value``. For the
    plan caches a wrapper reads with ``cache.get(key) or remember(cache, key, build())`` (values are truthy)."""
    if len(cache) >= PLAN_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def const_key(const: dict) -> tuple:
    """Hashable identity of a constexpr/options dict (for :func:`fast_launch`)."""
    return tuple(sorted(const.items()))


_LAUNCH_CONSTS: dict = {}


def launch_consts(**kw) -> tuple[dict, tuple]:
    """``(kw, const_key(kw))`` for :func:`fast_launch`, memoised on the keywords in call order, so a wrapper that
    names its constexprs in a fixed order builds and sorts no dict per call. The dict returned is shared: read it."""
    k = tuple(kw.items())
    return _LAUNCH_CONSTS.get(k) or remember(_LAUNCH_CONSTS, k, (kw, const_key(kw)))


def eager_cuda(x: torch.Tensor) -> bool:
    """True when a public entry point may skip its ``torch.library.custom_op`` and launch
    directly: a plain CUDA tensor, eager mode (no torch.compile / export tracing, no
    dispatch or function mode active), and no autograd graph to record."""
    return (
        type(x) is torch.Tensor
        and x.is_cuda
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


# ----------------------------------------------------------------------------- shared kernel code


GRID_DEP_WAIT_ASM = tl.constexpr("griddepcontrol.wait; // $0")  # also Gluon's (``_gluon.grid_dep_wait``)
# ... and its trigger (also ``_gluon.grid_dep_launch_dependents``)
GRID_DEP_LAUNCH_ASM = tl.constexpr("griddepcontrol.launch_dependents; // $0")


@jit_helper
def grid_dep_wait():
    """Programmatic dependent launch: wait until the launch before this one has finished and its writes are
    visible (a no-op in a launch that was not programmatic). sm_90+ only: call under a constexpr that
    :func:`pdl_supported` set."""
    tl.inline_asm_elementwise(GRID_DEP_WAIT_ASM, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@jit_helper
def l2_prefetch(ptrs, live):
    """Ask L2 for the lines at `ptrs` where `live` (int32, nonzero) without waiting for them
    (``prefetch.global.L2``): before a launch's :func:`grid_dep_wait`, a programmatic launch's first weight
    tiles stream from memory while the launch before it still runs. One pointer a 128-byte line is enough."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [ptrs, live], dtype=tl.int32, is_pure=False, pack=1)


@jit_helper
def l2_prefetch_rows(base_ptr, rows, row_hi, stride, lo, hi, SPAN: tl.constexpr, LINE: tl.constexpr):
    """:func:`l2_prefetch` of the elements [lo, min(hi, lo + SPAN)) of each of `rows` < row_hi (row-major,
    `stride` elements a row), one pointer every LINE elements (LINE elements = 128 bytes; SPAN and LINE powers
    of two)."""
    N_LINES: tl.constexpr = (SPAN + LINE - 1) // LINE
    cols = lo + tl.arange(0, N_LINES) * LINE
    live = (cols[None, :] < hi) & (rows[:, None] < row_hi)
    l2_prefetch(base_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], live.to(tl.int32))


@jit_helper
def grid_dep_launch_dependents():
    """Programmatic dependent launch: let the next launch start now (its programs wait in :func:`grid_dep_wait`)
    instead of when this one ends; a no-op when the next launch is not programmatic. sm_90+ only."""
    tl.inline_asm_elementwise(GRID_DEP_LAUNCH_ASM, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@jit_helper
def pdl_enter(TRIGGER: tl.constexpr, WAIT: tl.constexpr):
    """A launch's first step in a programmatic chain: TRIGGER lets the next launch (if programmatic) start now, it
    waits for our results in its own :func:`grid_dep_wait`; WAIT (this launch is programmatic) waits for the launch
    before, before anything it wrote is read or anything it may still read is overwritten."""
    if TRIGGER:
        grid_dep_launch_dependents()
    if WAIT:
        grid_dep_wait()


@jit_helper
def sym_scale(amax, EPS_C: tl.constexpr, QMAX: tl.constexpr):
    """A row's quantization scale from its max |x|: max(amax, EPS) / QMAX in IEEE division, as the reference
    (``per_token_quant_ref``).  Not Triton's ``/``: for the GPU that compiles to amax * div.approx(1, QMAX), and
    amax * RN(1 / 127) is another float than RN(amax / 127) for 1434 of the 31743 positive fp16 maxima."""
    return tl.math.div_rn(tl.maximum(amax, EPS_C), QMAX)


@jit_helper
def round_clamp_sym(y, QMAX: tl.constexpr):
    """Ties away from zero, clamped to [-QMAX, QMAX] (the quantizer's last step; float result): y's sign on
    floor(min(|y|, QMAX) + 0.5), the same integers as ``round_half_away_ref``'s floor(y + 0.5) / ceil(y - 0.5)
    then a clamp (checked on 10^7 fp32 values incl. 129 ulps around every half-integer in [-200, 200], QMAX 7 and
    127), in about half the instructions."""
    r = tl.floor(tl.minimum(tl.abs(y), QMAX) + 0.5)
    sign = y.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@jit_helper
def quantize_sym(x, scale, QMAX: tl.constexpr):
    """THE symmetric quantizer in kernels (``act_quant.quantize_symmetric_ref`` is its spec): x / scale
    (IEEE division), ties away from zero, clamped to [-QMAX, QMAX]; float result (callers cast)."""
    return round_clamp_sym(tl.math.div_rn(x, scale), QMAX)


@jit_helper
def quantize_sym_rcp(x, scale, rcp, QMAX: tl.constexpr, BOUNDED: tl.constexpr):
    """``quantize_sym(x, scale)`` for a scale shared by many elements, given ``rcp = div_rn(1, scale)`` (computed
    once per scale): x * rcp, then one FMA correction (Markstein: with rcp the correctly rounded reciprocal and
    q within an ulp of x / scale, fma(fma(-scale, q, x), rcp, q) is the correctly rounded quotient), three
    instructions where ``div_rn`` takes about 25 with its range check and slow-path branch.  Same integers as
    ``quantize_sym``: checked for every finite fp16 x against 3280 scales (incl. all-ones and power-of-two
    significands; the only bitwise difference in the quotient is the sign of a zero) and every finite bf16 x
    against 1500 (54 million pairs), and by the kernel tests.
    BOUNDED: |x| <= QMAX * scale by construction (a row's own max); else quotients past 2^20 (a static scale far
    below the data's range) skip the correction: they clamp either way, and an infinite q would make it NaN."""
    q = x * rcp
    q1 = tl.fma(tl.fma(-scale, q, x), rcp, q)
    if not BOUNDED:
        q1 = tl.where(tl.abs(q) < 1048576.0, q1, q)
    return round_clamp_sym(q1, QMAX)


@jit_helper
def splitk_slot(ws_ptr, tile, sk, SPLIT_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Addresses of K split ``sk``'s (ROWS, COLS) partial of ``tile`` in a split-K workspace (tiles * SPLIT_K *
    ROWS * COLS elements)."""
    offs_t = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    return ws_ptr + tile.to(tl.int64) * (SPLIT_K * ROWS * COLS) + sk * (ROWS * COLS) + offs_t


@jit_helper
def splitk_arrive(lock_ptr, tile, SPLIT_K: tl.constexpr):
    """Count this split of ``tile`` in (after storing its partial): True for the last to arrive, which sums the
    partials and resets the counter to 0 (``tl.atomic_xchg(lock_ptr + tile, 0)``)."""
    return tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1


@jit_helper
def splitk_sum(acc, ws_ptr, lock_ptr, tile, pid_k, SPLIT_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """In-kernel split-K reduction ("the split that arrives last sums"): stores this split's (ROWS, COLS)
    partial ``acc`` (int32: exact; fp32), and the last split of ``tile`` to arrive sums all of them and
    resets the tile's counter to 0. Returns (total, last): total is meaningful only where ``last``.
    ws: the workspace (tiles * SPLIT_K * ROWS * COLS, acc's dtype); lock: int32 counters, zero."""
    tl.store(splitk_slot(ws_ptr, tile, pid_k, SPLIT_K, ROWS, COLS), acc)
    last = splitk_arrive(lock_ptr, tile, SPLIT_K)
    tot = tl.zeros_like(acc)
    if last:
        for sk in tl.static_range(SPLIT_K):
            tot += tl.load(splitk_slot(ws_ptr, tile, sk, SPLIT_K, ROWS, COLS))
        tl.atomic_xchg(lock_ptr + tile, 0)
    return tot, last


@jit_helper
def splitk_sum_rows(acc_i, acc_f, is_fp, ws_ptr, lock_ptr, tile, pid_k, SPLIT_K: tl.constexpr, ROWS: tl.constexpr,
                    COLS: tl.constexpr):
    """``splitk_sum`` for the mixed INT8/FP16 row mode with both totals live (the GEMV's small tiles; the
    tensor-core kernel parks and sums the two row sets one after the other): INT8 rows keep exact int32 partials
    (so their outputs stay bit-identical to the plain path's), FP16 rows (``is_fp``, (ROWS,)) store their fp32
    partial's bits in the same int32 workspace. Returns (int32 total, fp32 total, last)."""
    packed = tl.where(is_fp[:, None], acc_f.to(tl.int32, bitcast=True), acc_i)
    tl.store(splitk_slot(ws_ptr, tile, pid_k, SPLIT_K, ROWS, COLS), packed)
    last = splitk_arrive(lock_ptr, tile, SPLIT_K)
    tot_i = tl.zeros((ROWS, COLS), dtype=tl.int32)
    tot_f = tl.zeros((ROWS, COLS), dtype=tl.float32)
    if last:
        for sk in tl.static_range(SPLIT_K):
            part = tl.load(splitk_slot(ws_ptr, tile, sk, SPLIT_K, ROWS, COLS))
            tot_i += tl.where(is_fp[:, None], 0, part)
            tot_f += tl.where(is_fp[:, None], part.to(tl.float32, bitcast=True), 0.0)
        tl.atomic_xchg(lock_ptr + tile, 0)
    return tot_i, tot_f, last


@jit_helper
def gemv_tile(N, BLOCK_N: tl.constexpr):
    """GEMV grid = (N tiles) x (K splits), N tile fastest: (tile, K split, its columns, their mask)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tile = pid % num_pid_n
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return tile, pid // num_pid_n, offs_n, offs_n < N


@jit_helper
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program ``pid`` of a split-K GEMM grid (SPLIT_K x tiles, split-major) -> (offs_m, offs_n, tile, pid_k):
    the rows and columns of its output tile, tiles in GROUP_M-row grouped order (consecutive programs share
    A rows in L2), the tile's linear index and its K split.  Without split-K every pid is a tile (pid_k 0)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    pid_k = pid // num_tiles
    tile = pid % num_tiles
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, tile, pid_k


@jit_helper
def load_k_tiles(a_ptrs, b_ptrs, offs_k, k0, k_bound, EVEN_K: tl.constexpr):
    """One K step of a GEMM: the (BLOCK_M, BLOCK_K) A tile at ``a_ptrs`` and the (BLOCK_K, BLOCK_N) B tile
    at ``b_ptrs`` (offs_k along K), with K positions ``k0 + offs_k >= k_bound`` read as 0 unless EVEN_K."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        a = tl.load(a_ptrs, mask=(offs_k[None, :] + k0) < k_bound, other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] + k0) < k_bound, other=0)
    return a, b


# one packed int32 word (8 nibbles: fields j at bits 4j, offset binary) and the 8 matching activations as four
# half2 pairs -> the fp32 sum of the 8 products. Two nibbles per LOP3 become fp16 magic numbers 1024 + u
# (fields 0/4, 2/6) or 1024 + 16u (fields 1/5, 3/7, whose activations come pre-divided by 16); one HSUB2 per
# pair removes 1024 + offset (+ zero) exactly, and HFMA2s multiply-accumulate a pair per instruction.
_H2_HEAD = """{
.reg .b32 t0, t1, t2, t3, wh, acc;
.reg .f16 lo, hi;
.reg .f32 flo, fhi;
lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 wh, $1, 8;
lop3.b32 t2, wh, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, wh, 0x00F000F0, 0x64006400, 0xEA;
"""
_H2_TAIL = """sub.f16x2 t0, t0, c0;
sub.f16x2 t1, t1, c1;
sub.f16x2 t2, t2, c0;
sub.f16x2 t3, t3, c1;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
fma.rn.f16x2 acc, t2, $4, acc;
fma.rn.f16x2 acc, t3, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}"""
H2_ASM_SYM = tl.constexpr(_H2_HEAD + ".reg .b32 c0, c1;\nmov.b32 c0, 0x64086408;\nmov.b32 c1, 0x64806480;\n"
                          + _H2_TAIL)
H2_ASM_ZERO = tl.constexpr(_H2_HEAD + ".reg .b32 c0, c1;\nmov.b32 c0, $6;\nmov.b32 c1, $7;\n" + _H2_TAIL)

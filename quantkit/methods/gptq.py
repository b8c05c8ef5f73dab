"""GPTQ as a recipe stage: Hessians per true-sequential step, one solve per step.

Per block, in the spec's true-sequential order (q/k/v, then o, then gate/up,
then down): run the block on the calibration batches with a hook on the step's
input to accumulate H = 2 X^T X / n, solve, write the dequantized weights back,
then go on, so each step sees the quantized outputs of the steps before it.
The pipeline then propagates the quantized block's outputs to the next block.

Why Hessians are re-captured here, also for the first step, instead of taken
from the pipeline's capture pass: that pass runs before every stage, so after a
transform stage (AWQ/SmoothQuant scales folded into norms and weights) its
statistics describe inputs the block no longer sees. Re-capturing the first step
is cheap (the forward stops right after the input norm). Linears of one step
share their input, so one Hessian serves them all, and their weights are solved
stacked as one matrix (rows are independent in GPTQ: same result, fewer column
iterations). With true_sequential=False one forward captures every step's
Hessian from the block as it was when the stage began.

Mixture of experts: every expert's gate/up and down are steps of their own (the
adapter expands them), and an expert's linears only ever run on the tokens the
router sent to it, so each Hessian is built from the routed tokens alone. The
experts' same projection is captured in one forward (`_phases`): they read
disjoint tokens of one input and none depends on another. A
Hessian from few tokens fits those tokens rather than the expert's inputs, so an
expert that saw fewer than `expert_min_tokens` x in_features tokens (default 1) is
quantized with RTN, and one below `expert_damp_tokens` x in_features (default 3)
is solved with damp 1.0 (one warning per block lists each kind). Measured on a
tiny Mixtral expert (W4 g32, error on 1024 held-out routed tokens / RTN's, 5 draws):

    tokens / in_features   0.17   0.5    1.0    2.0    3.0    5.3
    damp 0.01              1.50   2.25   2.02   1.17   0.98   0.87
    damp 1.0               1.07   1.00   0.93   0.91   0.89   0.87

Dense linears see every token and are never switched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.calib.capture import InputStats, capture_inputs
from quantkit.errors import RecipeError
from quantkit.methods import _rounding
from quantkit.methods.base import BlockContext, Method, register_method
from quantkit.methods.options import Flag, Int, Number, OneOf, WeightQuantizerOptions, option
from quantkit.quant.args import Scheme
from quantkit.quant.core import QuantizedTensor, quantize_weight
from quantkit.quant.gptq import BACKENDS, CholeskyError, gptq_quantize
from quantkit.quant.mse import WEIGHTS as MSE_WEIGHTS, MSESearch
from quantkit.quant.rounding import grid_start

# act_order on by default: on the default model it closes about half of the W4 g64 gap that plain
# GPTQ leaves (BENCHMARKS.md), and static groups keep the export in the standard layout.
# backend: the solve ("auto" = the fused Triton kernel on CUDA, torch ops otherwise; see
# quant.gptq.gptq_quantize); the two agree up to float32 rounding.
@dataclass
class GPTQOptions(WeightQuantizerOptions):
    """See `GPTQ`. expert_min_tokens / expert_damp_tokens: an MoE expert that saw fewer routed tokens than
    this many x in_features is quantized with RTN / solved with damp 1.0. mse*: the range search.
    learned_rounding (+ rounding_steps, rounding_lr, rounding_seed): refine GPTQ's result against the block output."""

    METHOD = "gptq"
    damp: float = option(0.01, Number(0, 1, low_open=True))
    block_size: int = option(128, Int(1))
    act_order: bool = option(True, Flag())
    true_sequential: bool = option(True, Flag())
    backend: str = option("auto", OneOf(BACKENDS))
    expert_min_tokens: float = option(1.0, Number(0, finite=False, note=" (x in_features)"))
    expert_damp_tokens: float = option(3.0, Number(0, finite=False, note=" (x in_features)"))
    # The range search weighted by the Hessian diagonal, on for weight-only 2-4 bit schemes ("auto"), with the
    # squared error (p 2: the diagonal approximation of the output's squared error). On the default model (W4 g64,
    # 32 x 512 calibration) it took GPTQ's gap on three held-out texts from +11.5/+13.3/+16.0% to +4.8/+7.9/+11.6%
    # (p 2.4: +6.5/+9.5/+12.0%); at W3 +61/+103/+95% (16 x 256) became +29/+43/+65%; with SmoothQuant 0.8 + GPTQ
    # W8A8 it cost 0.8 points, so 8-bit weights keep min/max (BENCHMARKS.md, issue 23).
    mse: bool | str = option("auto", Flag(auto=True))
    mse_weight: str = option("hessian", OneOf(MSE_WEIGHTS))
    mse_norm: float = option(2.0, Number(0, 10, low_open=True))
    # After the solve, each row's group scales re-solved by least squares for GPTQ's objective, the integers kept
    # (quant.gptq.refit_group_scales). Off: on the default model (CPU, 32 x 512) it lowered that objective and
    # worsened held-out text by 0.1-0.8 points (BENCHMARKS.md, issue 23).
    refit_scales: bool = option(False, Flag())
    # Asymmetric calibration (GPTAQ, "GPTQ v2"), its strength in [0, 1]: fit w_hat X (the inputs of the partly
    # quantized model) to w X_float (the float model's inputs) instead of to w X, so each layer also repairs the
    # error the layers before it left (quant.gptq.asymmetric_target; the target moves the fraction gptaq of the
    # way, 0 = GPTQ). Costs a second activation stream through the float blocks. "auto": AUTO_GPTAQ for
    # weight-only schemes of 4 bits or fewer, 0 otherwise (see AUTO_GPTAQ for the measurements).
    gptaq: float | str = option("auto", Number(0, 1, auto=True, note=" (0 = off, 1 = full asymmetric calibration)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mse is True and self.backend == "triton" and not self.act_order:
            raise RecipeError("gptq option mse with act_order false computes group scales in the torch solve; "
                              "use backend: auto or torch")

    def search_for(self, scheme: Scheme) -> MSESearch | None:
        if self.mse == "auto" and self.backend == "triton" and not self.act_order:
            return None  # the solve asked for cannot search (above): "auto" means min/max there
        return super().search_for(scheme)

    def gptaq_for(self, scheme: Scheme) -> float:
        """The asymmetric calibration strength to run under `scheme` (0 = plain GPTQ)."""
        if self.gptaq != "auto":
            return float(self.gptaq)
        return AUTO_GPTAQ if self.auto_on(scheme) else 0.0


# gptaq "auto" for weight-only schemes of 4 bits or fewer. Measured on the default model (CPU, W4 g64, 32 x 512
# calibration, gaps on pydoc / code / prose held-out text, 16 windows each; BENCHMARKS.md, issue 23): strength 0
# +4.75/+7.91/+10.77%, 0.25 +4.01/+6.41/+10.56%, 1 +3.65/+8.35/+15.04% (full strength fits the calibration text);
# calibrated on builtin:mix: 0 +5.61/+6.32/+9.10%, 0.25 +4.76/+5.22/+6.62%, 1 +4.29/+5.85/+9.59%.
AUTO_GPTAQ = 0.25


DEFAULTS = GPTQOptions()  # by key: DEFAULTS["act_order"]


class _StopForward(Exception):
    """Raised by a hook once the linears we need have seen their input."""


@contextmanager
def _stop_at(block: nn.Module, module: nn.Module) -> Iterator[None]:
    """Cut each block forward short when `module` is about to run.

    The hook must be registered after the capture hooks (pre-hooks run in
    registration order), so the inputs are recorded before the stop. The
    block's forward is wrapped so the stop ends only the current batch: it
    returns the block input unchanged, which the caller discards.
    """

    def hook(_mod, _args):
        raise _StopForward

    had_own = "forward" in block.__dict__  # e.g. an accelerate hook already wraps it
    own = block.__dict__.get("forward")
    inner = block.forward

    def forward(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except _StopForward:
            return args[0] if args else kwargs["hidden_states"]

    handle = module.register_forward_pre_hook(hook)
    block.forward = forward
    try:
        yield
    finally:
        handle.remove()
        if had_own:
            block.forward = own
        else:
            del block.forward


@register_method("gptq")
class GPTQ(Method):
    """Options: damp (0, 1] = 0.01, block_size = 128, act_order = true (static groups), true_sequential = true,
    backend = auto (auto / torch / triton: which solve runs), mse = auto (on for weight-only schemes of 4 bits
    or fewer; + mse_weight = hessian, mse_grid, mse_max_shrink, mse_norm: the per-group range search of
    quant.mse where GPTQ computes its group scales), gptaq = auto (asymmetric calibration's strength in [0, 1]:
    match the float model's outputs; auto = AUTO_GPTAQ for weight-only schemes of 4 bits or fewer, else 0)."""

    # Hessians are captured per true-sequential step inside apply_block (the shared
    # capture pass runs before earlier stages change the block, so its Hessians would be stale).
    stats = frozenset()
    needs_data = True
    plan_stats = frozenset({"hessian_step"})  # what the memory planner should count
    Options = GPTQOptions

    def __init__(self, scheme, **options):
        super().__init__(scheme, **options)
        self.mse = self.opts.search_for(scheme)  # the per-group range search (quant.mse), None = min/max
        self.gptaq = self.opts.gptaq_for(scheme)  # asymmetric calibration's strength, 0 = off

    @property
    def needs_reference(self) -> bool:
        return self.gptaq > 0

    def resolved_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.opts.mse == "auto":
            out["mse"] = self.mse.describe() if self.mse is not None else "off (min/max ranges)"
        if self.opts.gptaq == "auto":
            out["gptaq"] = self.gptaq
        return out

    @torch.no_grad()
    def apply_block(self, ctx: BlockContext) -> None:
        if not self.final:
            raise RecipeError("gptq quantizes the weights, so it must be the last stage of a recipe; move it to the end")
        rounding = self.opts.rounding
        if rounding is not None:  # the target and the weights learned rounding starts from: before the solve
            targets = _rounding.float_targets(ctx)
            floats = {n: ctx.linears[n].weight.data.clone() for n in _rounding.learned_names(ctx, "gptq")}
        self._solve_block(ctx)
        if rounding is not None:
            starts = {n: grid_start(w, ctx.results[n].to(w.device), ctx.linears[n].weight.dtype)
                      for n, w in floats.items()}
            del floats
            _rounding.refine(ctx, self.scheme.weights, starts, targets, rounding, "gptq")

    def _solve_block(self, ctx: BlockContext) -> None:
        """GPTQ on every quantized linear of the block, step by step (see the module docstring)."""
        steps = _steps(ctx)
        self._few: list[str] = []  # experts switched to RTN in this block: "name (tokens)"
        self._damped: list[str] = []  # experts solved with damp 1.0
        ref_block = _reference_block(ctx) if self.needs_reference else None
        if self.opts.true_sequential:
            for phase in _phases(ctx, steps):
                hess = _capture(ctx, phase, ref_block)
                for step in phase:
                    self._solve_step(ctx, step, hess.pop(step[0]))
        else:
            hess = _capture(ctx, steps, ref_block)
            for step in steps:
                self._solve_step(ctx, step, hess.pop(step[0]))
        del ref_block
        if self._few:
            ctx.warnings.append(
                f"gptq: {len(self._few)} expert linear(s) of {ctx.name} saw fewer than "
                f"{self.opts.expert_min_tokens:g} x in_features routed calibration tokens and were quantized with RTN: {', '.join(self._few)} "
                "(more --samples, or the recipe option expert_min_tokens, changes this)"
            )
        if self._damped:
            ctx.warnings.append(
                f"gptq: {len(self._damped)} expert linear(s) of {ctx.name} saw fewer than "
                f"{self.opts.expert_damp_tokens:g} x in_features routed calibration tokens and were solved with damp 1.0: {', '.join(self._damped)} "
                "(more --samples, or the recipe option expert_damp_tokens, changes this)"
            )

    def _solve_step(self, ctx: BlockContext, names: list[str], stats: InputStats) -> None:
        """Quantize the linears `names` (sharing one input) with their Hessian; frees it."""
        args = self.scheme.weights
        if stats.xtx is None or stats.count == 0:
            for n in names:
                self._rtn(ctx, n)
            ctx.warnings.append(f"{', '.join(names)}: saw no calibration tokens; quantized with RTN instead of GPTQ")
            return
        experts = ctx.spec.experts.path if ctx.spec is not None and ctx.spec.experts is not None else None
        damp = self.opts.damp
        if experts and f".{experts}." in names[0]:  # few routed tokens: RTN, or a heavily damped solve
            in_f = ctx.linears[names[0]].in_features
            label = ", ".join(f"{n.removeprefix(ctx.name + '.')} ({stats.count})" for n in names)
            if stats.count < self.opts.expert_min_tokens * in_f:
                for n in names:
                    self._rtn(ctx, n)
                self._few.append(label)
                return
            if stats.count < self.opts.expert_damp_tokens * in_f and damp < 1.0:
                damp = 1.0
                self._damped.append(label)
        h = stats.hessian
        cross = stats.take_cross(self.gptaq) if isinstance(stats, _StepStats) else None  # asymmetric calibration
        stats.xtx = None
        lins = [ctx.linears[n] for n in names]
        dtypes = {lin.weight.dtype for lin in lins}
        groups = [names] if len(dtypes) == 1 else [[n] for n in names]  # stack only like with like
        for group in groups:
            ws = [ctx.linears[n].weight.data for n in group]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)  # w: (sum of out, in)
            try:
                res = gptq_quantize(
                    w, h, args, damp=damp, block_size=self.opts.block_size, act_order=self.opts.act_order,
                    scale_dtype=ws[0].dtype, backend=self.opts.backend, mse=self.mse,
                    refit_scales=self.opts.refit_scales, cross=cross,
                )
            except CholeskyError as e:
                for n in group:
                    self._rtn(ctx, n)
                ctx.warnings.append(f"{', '.join(group)}: GPTQ failed ({e}); quantized with RTN instead")
                continue
            del w
            if res.damp != damp:
                ctx.warnings.append(
                    f"{', '.join(group)}: Hessian not positive definite at damp {damp:g}; solved with damp {res.damp:g}"
                )
            qt, row = res.qt, 0
            for n, wn in zip(group, ws):
                rows = slice(row, row + wn.shape[0])
                row += wn.shape[0]
                # clone: each result owns its storage (safetensors refuses shared tensors)
                part = QuantizedTensor(
                    qt.q[rows].clone(),
                    qt.scale[rows].clone(),
                    None if qt.zero is None else qt.zero[rows].clone(),
                    args,
                )
                wn.copy_(part.dequantize(wn.dtype))
                ctx.results[n] = part.to("cpu")
            del res, qt
        del h, cross

    def _rtn(self, ctx: BlockContext, name: str) -> None:
        lin = ctx.linears[name]
        qt = quantize_weight(lin.weight.data, self.scheme.weights)
        lin.weight.data.copy_(qt.dequantize(lin.weight.dtype))
        ctx.results[name] = qt.to("cpu")


def _steps(ctx: BlockContext) -> list[list[str]]:
    """True-sequential steps, plus any quantized linear the spec does not list (one step each, last)."""
    steps = ctx.steps()
    listed = {n for s in steps for n in s}
    return steps + [[n] for n in ctx.linears if n not in listed]


def _phases(ctx: BlockContext, steps: list[list[str]]) -> list[list[list[str]]]:
    """Steps grouped into what one forward can capture: a step alone, or the run of every expert's same
    projection (experts.0.w1, experts.1.w1, ...), which read disjoint tokens of one input and do not
    depend on each other, so one forward records all their Hessians (instead of one forward each)."""
    ex = ctx.spec.experts.path if ctx.spec is not None and ctx.spec.experts is not None else None
    pat = re.compile(rf"\.{re.escape(ex)}\.\d+\.") if ex else None

    def role(step: list[str]) -> str | None:
        return pat.sub(f".{ex}.*.", step[0]) if pat is not None and pat.search(step[0]) else None

    out: list[list[list[str]]] = []
    for step in steps:
        if out and role(step) is not None and role(step) == role(out[-1][-1]):
            out[-1].append(step)
        else:
            out.append([step])
    return out


class _StepStats(InputStats):
    """A step's Hessian statistics, plus (asymmetric calibration) dxtx = sum (x_float - x)^T x over the same
    tokens; `take_cross` hands it over with the Hessian's normalisation (quant.gptq.gptq_quantize's `cross`)."""

    def __init__(self):
        super().__init__({"hessian"})
        self.dxtx: torch.Tensor | None = None

    def take_cross(self, strength: float) -> torch.Tensor | None:
        """2 dxtx / n x strength, scaled in place (no (in, in) copy); the statistics no longer hold it."""
        d, self.dxtx = self.dxtx, None
        return None if d is None else d.mul_(2.0 / max(self.count, 1)).mul_(strength)

    @torch.no_grad()
    def add_pair(self, x: torch.Tensor, x_float: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # once: add() takes it as it is
        self.add(x)
        dx = x_float.reshape(-1, x.shape[-1]).float() - x
        self.dxtx = dx.T @ x if self.dxtx is None else self.dxtx.addmm_(dx.T, x)


def _reference_block(ctx: BlockContext) -> nn.Module:
    """A float copy of the block as this stage receives it (after earlier transform stages), to run on the float
    model's inputs: the inputs its linears would see in the float model."""
    import copy

    if ctx.reference is None:
        raise RecipeError("gptq option gptaq needs the float model's activations, which this run does not carry")
    return copy.deepcopy(ctx.block)


def _is_expert(ctx: BlockContext, name: str) -> bool:
    ex = ctx.spec.experts.path if ctx.spec is not None and ctx.spec.experts is not None else None
    return ex is not None and f".{ex}." in name


@torch.no_grad()
def _capture(ctx: BlockContext, steps: list[list[str]], ref_block: nn.Module | None = None) -> dict[str, InputStats]:
    """Run the block on all calibration batches; Hessian stats of each step's (shared) input.

    Keyed by the step's first linear. For one step the forward stops as soon as
    that step's input is recorded (most of the block is skipped); several steps
    run the whole block (a linear the spec does not list has no known position).
    With `ref_block` (asymmetric calibration) each batch also runs through it on the float model's inputs and
    every step pairs the two inputs token by token (`_StepStats`); an MoE expert's steps do not (the two
    models route different tokens to it) and get plain Hessians.
    """
    firsts = {s[0]: ctx.linears[s[0]] for s in steps}
    paired = {} if ref_block is None else {n: m for n, m in firsts.items() if not _is_expert(ctx, n)}
    if not paired:
        with capture_inputs(firsts, {"hessian"}) as stats:
            if len(steps) == 1:
                with _stop_at(ctx.block, firsts[steps[0][0]]):
                    ctx.forward()
            else:
                ctx.forward()
        return stats
    return _capture_paired(ctx, firsts, paired, ref_block)


def _capture_paired(ctx: BlockContext, firsts: dict[str, nn.Module], paired: dict[str, nn.Module],
                    ref_block: nn.Module) -> dict[str, InputStats]:
    """`_capture` with asymmetric calibration: batch by batch, the reference block on the float inputs records
    each paired step's input, then the block on the quantized-model inputs adds (x, x_float) pairs."""
    rel = {n: n.removeprefix(ctx.name + ".") for n in paired}
    ref_mods = {n: ref_block.get_submodule(r) for n, r in rel.items()}
    stats: dict[str, InputStats] = {n: (_StepStats() if n in paired else InputStats({"hessian"})) for n in firsts}
    x_float: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def hook(_mod, args):
            x_float[name] = args[0].detach()
        return hook

    def pair(name):
        def hook(_mod, args):
            if name in paired:
                stats[name].add_pair(args[0], x_float.pop(name))
            else:
                stats[name].add(args[0])
        return hook

    one = len(firsts) == 1
    try:
        for n, m in ref_mods.items():
            handles.append(m.register_forward_pre_hook(keep(n)))
        for n, m in firsts.items():
            handles.append(m.register_forward_pre_hook(pair(n)))
        with (_stop_at(ref_block, ref_mods[next(iter(firsts))]) if one else nullcontext()), \
                (_stop_at(ctx.block, firsts[next(iter(firsts))]) if one else nullcontext()):
            for j in range(ctx.n_batches):
                h_ref, kw = ctx.reference(j)
                ref_block(h_ref, **kw)
                h, kw = ctx.batch(j)
                ctx.block(h, **kw)
                if x_float:
                    raise RuntimeError(f"gptaq: {sorted(x_float)} ran in the float block but not in the block")
    finally:
        for hd in handles:
            hd.remove()
    return stats

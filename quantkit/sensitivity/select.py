"""`--target-fraction`: which linears to keep in FP16, chosen so that the choice holds on text it never saw.

Units. vLLM fuses q/k/v and gate/up into one layer that must share a precision, and
`--sensitive` keeps a whole fused group in FP16 when one member is flagged. So the
selection chooses whole units (a fused group, or a lone linear such as o_proj or
down_proj), each costing its number of linears, and the budget
k = floor(fraction x linears) counts every linear the checkpoint keeps in FP16: what the
file flags is exactly what `--sensitive` exports.

Data. The selection reads only `windows`: non-overlapping windows of the calibration
text (the builtin corpus's first half; `api.selection_windows`). The held-out text that
`quantkit eval` scores (the builtin's second half, or any other text) is never read.

Measured damage, per unit u and per selection window w:
  restore gain g[u, w] = NLL_w(all quantized) - NLL_w(all quantized but u)
(summed token NLL; one forward over the windows per measured unit), the damage measured
alone
  alone damage d[u, w] = NLL_w(only u quantized) - NLL_w(float)
(one more forward per measured unit), and optionally the gradient-weighted output error of
`quantkit.sensitivity.fisher`, per window. A rule turns per-unit values summed over some
windows into a choice: a 0/1 knapsack (values, costs = unit sizes, capacity k), solved
exactly by dynamic programming. Rules: "restore" (measured gains; units with a positive sum
only), "alone" (measured damages, likewise), "fisher" (when measured), "rel_err"
(the scan's relative output error summed over the unit; it reads no window NLL), and,
when asked (`greedy` = N), "greedy": the knapsack adds single-unit gains, but two units
can repair the same error (restoring both gains less than the sum), so "greedy" picks one
unit at a time, the best gain per linear given the units already picked, re-measuring
candidates with the picks restored after each pick: lazily, in order of their last measured
gain, at most N a pick, until the best fresh gain beats every remaining one's last.

Cross-validation. The windows are cut into `folds` contiguous folds (neighbouring windows
share a topic, so contiguous folds are the harder, more honest split). For each rule and
fold f, the rule chooses from the other folds' windows only, and the choice is scored on
fold f. Pooling the folds, every window is scored by a choice made without it: that
pooled recovery of the perplexity gap is the rule's out-of-sample estimate. The default
rule (alone when units are measured, else fisher, else restore) is kept unless another rule
did better in every fold (`pick_rule`: the best pooled estimate alone carried luck over to unseen text); the
kept rule chooses again from all windows, and the report states its estimate as the
recovery to expect on unseen text like the calibration text (the in-sample recovery of
the final choice is recorded beside it to show how much choosing on the scoring windows
would flatter it).

Cross-fitting (`fold_weights`, for a method fit to calibration data such as GPTQ). The
selection windows are calibration text, and at the defaults most of it is text GPTQ was
calibrated on, where a GPTQ model does better than on unseen text; gains measured there
say little about unseen text. Given one set of method weights per fold, each fit on
calibration samples sharing no text with that fold's windows, every window's NLL (all
quantized, each unit restored, each fold's choice, the final choice) is measured with its
fold's weights: each window is then text the weights it is scored with never saw.
`quantkit scan --method gptq --target-fraction` does this by default (`run.resolve_cross_fit`):
measured on the default model (H100), it took GPTQ's held-out recovery from 29.5% / 21.0%
(expected 58.7%) to 46.7% / 37.1% (expected 44.0%).

Why both directions of measurement: a knapsack adds single-unit values, and neither is
additive. With everything else quantized, restoring one unit alone raised the NLL for 94 of
120 units of the default model in W8A8 (the gains summed to -4.2x the gap that restoring
all closes), while each unit's damage alone summed to +0.88x of the gap (CPU, W8A8;
BENCHMARKS.md, issue 24). Measured at full size on an H100, the knapsack over alone damages
recovered 45.8% / 48.8% of W8A8's gap on unseen pydoc / stdlib source (restore's 25.4% / 24.0%,
fisher's 37.0% / 47.3%), and restore's choice was the best for W4A16 g64 (44.4% / 41.0%
against alone's 41.5% / 39.8%).

Forward passes over the selection windows: 2 (float, all quantized) + 2 x measured units
+ 1 per rule (its K fold scores) + 1 (the final choice, in-sample); the default model has
210 linears in 120 units, so 2 + 240 + 4 + 1 = 247. "greedy" adds up to N per pick after
the first (one when the best candidate's gain holds), for each of its K + 1 choices (a restored
set measured once is reused). A restore gain's pass starts at its unit's decoder block from the
all-quantized model's hidden states, an alone damage's from the float model's
(quantkit.sensitivity.prefix: the same numbers; the selection ran 1.54x faster on the default
model on CPU), so each costs about 0.6 of a whole forward there.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.recipe import Scheme
from quantkit.sensitivity.io import FUSED_GROUPS
from quantkit.sensitivity.partial import quantized_subset, recovered_fraction
from quantkit.sensitivity.prefix import BlockPrefix
from quantkit.sensitivity.scan import LayerScan, precision_label
from quantkit.sensitivity.weights import RTN, ScanWeights

RULES = ("restore", "alone", "greedy", "fisher", "rel_err")  # in order of preference when their estimates tie
# the rule chosen unless another one does better in every fold (pick_rule): the first of these that chose
DEFAULT_RULES = ("alone", "fisher", "restore", "greedy", "rel_err")
GREEDY_WITH_CROSS_FIT = "--greedy cannot be combined with --cross-fit yet: use one of them (or --no-cross-fit)"
DEFAULT_FOLDS = 4


def selection_units(names: Sequence[str]) -> list[tuple[str, ...]]:
    """`names` (model order) partitioned into fused units: q/k/v of one attention, gate/up of one MLP, else alone.

    A fused group counts only its members present in `names`; units are ordered by their first member.
    """
    present = set(names)
    unit_of: dict[str, tuple[str, ...]] = {}
    for n in names:
        prefix, _, leaf = n.rpartition(".")
        group = next((g for g in FUSED_GROUPS if leaf in g), None)
        if group is None:
            unit_of[n] = (n,)
            continue
        unit_of[n] = tuple(f"{prefix}.{m}" for m in group if f"{prefix}.{m}" in present)
    out, seen = [], set()
    for n in names:
        u = unit_of[n]
        if u not in seen:
            seen.add(u)
            out.append(u)
    return out


def knapsack(values: Sequence[float], costs: Sequence[int], capacity: int) -> list[int]:
    """Indices (ascending) of the items with positive value whose total cost <= capacity and whose value
    sum is the largest possible (0/1 knapsack, exact). Ties go to the earlier items."""
    items = [i for i, v in enumerate(values) if v > 0 and math.isfinite(v) and 0 < costs[i] <= capacity]
    if capacity <= 0 or not items:
        return []
    # best[c] = (value, chosen) using at most cost c; items in order, strict > keeps the earlier choice on ties
    best: list[tuple[float, tuple[int, ...]]] = [(0.0, ())] * (capacity + 1)
    for i in items:
        c_i, v_i = costs[i], values[i]
        for c in range(capacity, c_i - 1, -1):
            cand = best[c - c_i][0] + v_i
            if cand > best[c][0]:
                best[c] = (cand, best[c - c_i][1] + (i,))
    return sorted(max(best, key=lambda b: b[0])[1])


def fp16_budget(fraction: float, n_linears: int) -> int:
    """Linears a `--target-fraction` choice may keep in FP16: floor(fraction x linears)."""
    return int(math.floor(fraction * n_linears + 1e-9))


def knapsack_linears(values: Sequence[float], units: Sequence[tuple[str, ...]], budget: int,
                     costs: Sequence[int] | None = None) -> list[str]:
    """The linears of the units a knapsack over per-unit `values` keeps (each unit costs its linears)."""
    costs = [len(u) for u in units] if costs is None else costs
    return [m for i in knapsack(values, costs, budget) for m in units[i]]


def cv_folds(n: int, folds: int) -> list[range]:
    """`folds` contiguous, near-equal, non-empty index ranges covering 0..n-1 (fewer when n < folds)."""
    if n < 1:
        raise ValueError("cross-validation needs at least one window")
    k = max(1, min(folds, n))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(k)]


@dataclass
class Selection:
    """The result: the linears to keep in FP16 and what was measured to choose them."""

    chosen: list[str]  # whole units, model order
    rule: str | None
    budget: int
    ppl: dict[str, Any]  # baseline / all_quantized / mixed (in-sample) / recovered / expected / ...
    candidates: list[dict[str, Any]]  # one per rule: its CV estimate and its final choice
    # what the rules read, per unit (model order) and selection window: "gains" (restore gains, 0 where not
    # measured), "alone" (alone damages, likewise), "fisher" (if measured), "allq" / "base" (per-window NLL), "costs" (linears per unit): a knapsack
    # rule's choices can be replayed offline from it (scoring a choice still takes a forward pass; added restore
    # gains only estimate it). benchmarks/sensitivity.py saves it beside its results.
    measurements: dict[str, torch.Tensor] | None = None


def _ppl(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)


@torch.no_grad()
def select_fp16(
    model: nn.Module,
    layers: Sequence[LayerScan],
    scheme: Scheme,
    windows: torch.Tensor,
    fraction: float,
    *,
    folds: int = DEFAULT_FOLDS,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    shortlist: int | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[str], None] | None = None,
    weights: ScanWeights = RTN,
    greedy: int | None = None,
    fold_weights: Sequence[ScanWeights] | None = None,
    start_at_block: bool = True,
) -> Selection:
    """Choose whole units, at most floor(fraction x len(layers)) linears, to keep in FP16 (see module docstring).

    windows: (n, seqlen) selection windows from the calibration text; folds: cross-validation folds;
    shortlist: units whose restore gain is measured (None = all; else the largest by fisher, or rel_err
    without it, per linear of the unit; 0 = none); fisher: name -> per-window gradient-weighted error on `windows` (or None).
    weights: what "quantized" means (quantkit.sensitivity.weights): the scheme's RTN, or e.g. GPTQ's weights, so
    that the gains, the all-quantized baseline and the expected recovery refer to the model the file is used with.
    greedy: also try the "greedy" rule, re-measuring this many candidates per pick (None or 0: not tried).
    fold_weights: cross-fitting (module docstring): one ScanWeights per fold, each fit without that fold's
    windows; every window is then measured with its fold's weights (not with `greedy`).
    start_at_block: measure each restore gain from its unit's block on (quantkit.sensitivity.prefix: the same
    numbers, fewer blocks run); False: whole forwards.
    Sets each layer's flag, and restore_gain (of its unit, in perplexity) for measured units.
    """
    from quantkit.errors import UsageError

    if not 0 < fraction < 1:
        raise UsageError(f"--target-fraction {fraction} must be between 0 and 1 (e.g. 0.10)")
    t0 = time.perf_counter()
    search = _Search(model, layers, windows, fraction, folds, batch_size, on_step or (lambda _m: None))
    search.use_prefix = start_at_block
    if fold_weights is not None and len(fold_weights) != len(search.parts):
        raise ValueError(f"fold_weights: {len(fold_weights)} sets for {len(search.parts)} folds")
    if fold_weights is not None and greedy:
        raise UsageError(GREEDY_WITH_CROSS_FIT)
    if device is not None:
        model.to(device)  # before quantizing: the float copies then live beside the weights
    search.say(f"selection: float model on {search.n} calibration windows")
    base = search.nll(windows)
    rel = [sum(search.by_name[m].rel_err for m in u) for u in search.units]
    fish = None
    if fisher is not None:
        fish = torch.stack([sum(fisher[m] for m in u) for u in search.units])  # (units, windows)
    measured = _shortlist(search.costs, fish.sum(dim=1).tolist() if fish is not None else rel, shortlist)
    # "alone" first, on the float model: each window with the weights it is scored with (its fold's when cross-fit)
    part_weights = [(range(search.n), weights)] if fold_weights is None else list(zip(search.parts, fold_weights))
    damage = search.alone_damages(measured, base, scheme, part_weights)
    with contextlib.ExitStack() as stack:
        if fold_weights is None:  # one quantized model for every window: entered once, kept open
            q = stack.enter_context(quantized_subset(model, search.names, scheme, weights))
            search.measure_with([(range(search.n), lambda: contextlib.nullcontext(q))])
        else:  # each fold's windows with its own weights, entered in turn (float in between)
            search.measure_with([(part, lambda w=w: quantized_subset(model, search.names, scheme, w))
                                 for part, w in zip(search.parts, fold_weights)])
        search.say("selection: all quantized")
        allq, gains = search.restore_gains(measured)
        rules = search.rules(gains, damage, measured, fish, rel)
        if greedy and measured and search.budget > 0:
            rules = {**rules, "greedy": lambda idx: search.greedy_choice(q, allq, gains, measured, greedy, idx)}
            rules = {r: rules[r] for r in RULES if r in rules}
        candidates = [search.cross_validate(rule, rules[rule], base, allq) for rule in rules]
        best = pick_rule(candidates)
        chosen = best["layers"] if best is not None else []
        mixed = search.in_sample(best, allq)
    search.set_results(layers, scheme, measured, gains, allq, chosen)
    method = weights.method + (f", cross-fitted over {len(search.parts)} folds" if fold_weights is not None else "")
    ppl = search.summary(base, allq, mixed, best, measured, method)
    ppl["seconds"] = time.perf_counter() - t0
    data = {"gains": gains, "alone": damage, "allq": allq, "base": base,  # float64 but costs
            "costs": torch.tensor(search.costs)}
    if fish is not None:
        data["fisher"] = fish
    return Selection(chosen, best["rule"] if best else None, search.budget, ppl, candidates, data)


def pick_rule(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The candidate whose choice is kept: the default rule (the first of DEFAULT_RULES with a choice) unless
    another rule's fold choices scored a lower NLL on every fold's windows (then the best such by pooled
    estimate).

    Why not simply the best pooled estimate: the estimates of different rules differ by less than their noise,
    and the best of several noisy estimates is picked for its luck as much as for its rule. Measured on the
    default model (H100, full size; BENCHMARKS.md, issue 24), the rule with the best estimate did not carry over
    to unseen text: restore's estimate led fisher's by 2 points (3 folds of 4) in a GPTQ run and its choice
    recovered 28.9% / 18.4% of the gap on unseen pydoc / stdlib source, where fisher's choice (the same 21
    linears, chosen in another run) recovered 46.7% / 37.1%; restore's choice won every fold for W4A16 RTN and
    carried over (44.4% / 41.0%); again in session 33 (restore won every W4A16 fold; for W8A8 its estimate led
    by 4 points in 2 folds of 4, and its choice recovered 30.2% on stdlib source against fisher's 47.9%). A rule
    that wins all K folds by chance has odds 2^-K (1 in 16 at 4 folds).
    Why "alone" is the default (session 34, H100, full size, every rule's final choice scored on unseen text):
    its cross-validated estimate was the best for W8A8 (43.0%) and GPTQ (40.5%) and second for W4A16 g64 (41.4%,
    where restore's 44.9% won every fold and was kept). Kept that way, the choices recovered W8A8 45.8% / 48.8%
    (fisher's, the default before, 37.0% / 47.3%), W4A16 g64 44.4% / 41.0% (restore), GPTQ 33.9% / 25.8% (fisher's
    37.4% / 32.3%: the one scheme where the old default carried over better; GPTQ on a GPU varied between sessions'
    machines, and the same fisher choice measured 46.7% / 37.1% in session 33).
    Each candidate gets "beats_default" (None for the default itself); the winner's "why" says which case held.
    """
    chose = [c for c in candidates if c["layers"]]
    if not chose:
        return None
    default = next(c for r in DEFAULT_RULES for c in chose if c["rule"] == r)
    for c in chose:  # "better" = a lower summed NLL of the fold's windows (a fold's gap can be negative)
        c["beats_default"] = None if c is default else (
            len(c["fold_nll"]) == len(default["fold_nll"])
            and all(a < b for a, b in zip(c["fold_nll"], default["fold_nll"])))
    challengers = [c for c in chose if c["beats_default"]]
    if not challengers:
        default["why"] = f"{default['rule']} is the default rule; no other rule did better in every fold"
        return default
    best = min(challengers, key=lambda c: c["cv_ppl"])  # the best pooled estimate; first in RULES order on ties
    best["why"] = f"did better than the default rule {default['rule']} in every fold"
    return best


def _shortlist(costs: list[int], values: list[float], shortlist: int | None) -> list[int]:
    """Indices (ascending) of the units whose restore gain is measured: all, or the `shortlist` largest by
    value per linear (the budget counts linears)."""
    measured = list(range(len(costs)))
    if shortlist is None:
        return measured
    key = [v / c for v, c in zip(values, costs)]
    order = sorted(measured, key=lambda i: -key[i] if math.isfinite(key[i]) else math.inf)
    return sorted(order[: max(0, shortlist)])


class _Search:
    """One selection's fixed facts (units, costs, budget, folds) and its count of forward passes."""

    def __init__(self, model, layers, windows, fraction, folds, batch_size, say):
        self.model = model
        self.windows = windows
        self.batch_size = batch_size
        self.say = say
        self.names = [e.name for e in layers]
        self.by_name = {e.name: e for e in layers}
        self.units = selection_units(self.names)
        self.costs = [len(u) for u in self.units]
        self.budget = fp16_budget(fraction, len(self.names))
        self.n = int(windows.shape[0])
        self.tokens = self.n * (int(windows.shape[1]) - 1)  # predicted tokens over all windows
        self.parts = cv_folds(self.n, folds)
        self.evaluations = 0  # forward passes over the windows (a rule's K fold scores make one)
        self.use_prefix = True  # restore gains start at the unit's block (quantkit.sensitivity.prefix)
        self.prefix_agrees: bool | None = None  # its check against the whole forward (made once: a model property)
        self.greedy_nll: dict[frozenset[int], torch.Tensor] = {}  # restored units -> per-window NLL ("greedy")
        # (windows, quantized-model context) pairs covering the windows: one, or one per fold (cross-fitting)
        self.parts_with: list[tuple[range, Callable[[], Any]]] = []

    def measure_with(self, parts_with: list[tuple[range, Callable[[], Any]]]) -> None:
        """The (windows, quantized-model context) pairs the measurements use; they must cover every window once."""
        covered = sorted(i for part, _ in parts_with for i in part)
        if covered != list(range(self.n)):
            raise ValueError(f"measurement parts cover windows {covered[:8]}..., not each of the {self.n} once")
        self.parts_with = parts_with

    def nll(self, sel: torch.Tensor, *, counts: bool = True) -> torch.Tensor:
        from quantkit.eval.perplexity import window_nll

        self.evaluations += counts
        return window_nll(self.model, sel, batch_size=self.batch_size)

    def restore_gains(self, measured: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-window NLL all quantized (windows,), and (units, windows) float64 restore gains: NLL(all
        quantized) - NLL(all quantized but the unit), for measured units; each part with its weights."""
        allq = torch.zeros(self.n, dtype=torch.float64)
        gains = torch.zeros(len(self.units), self.n, dtype=torch.float64)
        for f, (part, enter) in enumerate(self.parts_with):
            sel = self.windows[part.start : part.stop]
            where = f" (fold {f + 1}/{len(self.parts_with)}'s weights)" if len(self.parts_with) > 1 else ""
            with enter() as q:
                allq[part.start : part.stop] = self.nll(sel, counts=f == 0)
                prefix = self._prefix(sel, allq[part.start : part.stop]) if measured and self.budget else None
                for j, i in enumerate(measured):
                    if self.budget == 0:
                        break
                    self.say(f"selection: ({j + 1}/{len(measured)}) all quantized but {', '.join(self.units[i])}"
                             + where)
                    with q.restored(self.units[i]):
                        nll = self._unit_nll(sel, prefix, i, counts=f == 0)
                        gains[i, part.start : part.stop] = allq[part.start : part.stop] - nll
        return allq, gains

    def alone_damages(self, measured: list[int], base: torch.Tensor, scheme: Scheme,
                      part_weights: list[tuple[range, ScanWeights]]) -> torch.Tensor:
        """(units, windows) float64 damages of the measured units, each quantized alone in the float model:
        NLL(only the unit quantized) - NLL(float), each part's windows with its weights (`base`: the float
        per-window NLL). Zeros when nothing is measured or the budget is 0."""
        damage = torch.zeros(len(self.units), self.n, dtype=torch.float64)
        if not measured or self.budget == 0:
            return damage
        for f, (part, w) in enumerate(part_weights):
            sel, lo, hi = self.windows[part.start : part.stop], part.start, part.stop
            where = f" (fold {f + 1}/{len(part_weights)}'s weights)" if len(part_weights) > 1 else ""
            prefix = self._prefix(sel, base[lo:hi])  # the float model's block inputs
            for j, i in enumerate(measured):
                self.say(f"selection: ({j + 1}/{len(measured)}) only {', '.join(self.units[i])} quantized{where}")
                with quantized_subset(self.model, self.units[i], scheme, w):
                    nll = self._unit_nll(sel, prefix, i, counts=f == 0)
                damage[i, lo:hi] = nll - base[lo:hi]
        return damage

    def _unit_nll(self, sel: torch.Tensor, prefix: BlockPrefix | None, unit: int, *, counts: bool) -> torch.Tensor:
        """Per-window NLL of `sel` with the model as it is now: from the unit's block on when a prefix is kept
        (its blocks before are unchanged by the unit), else a whole forward."""
        if prefix is None:
            return self.nll(sel, counts=counts)
        return self.nll_from(prefix, prefix.block_of(self.units[unit]), counts=counts)

    def _prefix(self, sel: torch.Tensor, whole: torch.Tensor) -> BlockPrefix | None:
        """Forward passes from a unit's block (quantkit.sensitivity.prefix), if this model's blocks can be
        found and starting mid-way reproduces `whole`, the per-window NLL of `sel` with the model as it is now
        (checked once: whether blocks pass only hidden states along is the architecture's, not the weights')."""
        if not self.use_prefix or self.prefix_agrees is False:
            return None
        prefix = BlockPrefix.try_for(self.model, sel, self.batch_size)
        if prefix is None or self.prefix_agrees:
            return prefix
        self.prefix_agrees = prefix.agrees(whole)
        if not self.prefix_agrees:
            self.say("selection: starting at a block did not reproduce the whole forward; using whole forwards")
            return None
        self.say("selection: measurements start at each unit's block (checked against the whole forward)")
        return prefix

    def nll_from(self, prefix: BlockPrefix, start: int, *, counts: bool = True) -> torch.Tensor:
        """`nll` of the prefix's windows, blocks before `start` taken from the kept block inputs."""
        self.evaluations += counts
        return prefix.nll(start)

    def _restored_sum(self, names: list[str], part: range) -> float:
        """Summed NLL of the windows `part` with `names` restored, each window with its part's weights."""
        total = 0.0
        for p, enter in self.parts_with:
            lo, hi = max(p.start, part.start), min(p.stop, part.stop)
            if lo < hi:
                with enter() as q, q.restored(names):
                    total += float(self.nll(self.windows[lo:hi], counts=False).sum())
        return total

    def rules(self, gains, damage, measured, fish, rel) -> dict[str, Callable[[list[int]], list[str]]]:
        """Rule name -> the linears it keeps in FP16 when it reads the windows `idx`, in RULES order (the
        knapsack rules; "greedy" is added by select_fp16); none when the budget is 0."""
        values: dict[str, Callable[[list[int]], list[float]]] = {}
        if self.budget == 0:
            return {}
        if measured:
            done = set(measured)

            def summed(t: torch.Tensor) -> Callable[[list[int]], list[float]]:  # a measured (units, windows) table
                return lambda idx: [float(t[i, idx].sum()) if i in done else 0.0 for i in range(len(self.units))]

            values["restore"], values["alone"] = summed(gains), summed(damage)
        if fish is not None:
            values["fisher"] = lambda idx: fish[:, idx].sum(dim=1).tolist()
        if all(math.isfinite(r) for r in rel):
            values["rel_err"] = lambda _idx: list(rel)
        return {name: (lambda idx, v=v: self.choose(v(idx))) for name, v in values.items()}

    def greedy_choice(self, q, allq: torch.Tensor, gains: torch.Tensor, measured: list[int], width: int,
                      idx: list[int]) -> list[str]:
        """The "greedy" rule on the windows `idx`: units picked one at a time while the budget allows, each the
        largest gain per linear over the units already picked, stopping when no gain is positive.

        Evaluated lazily: a unit's last measured gain per linear (its single gain at first) is its bound, since
        a gain shrinks as other units are restored when they repair the same error. Candidates are re-measured
        with the picks restored in order of bound, at most `width` per pick, and the search for a pick stops as
        soon as the best fresh gain is at least every remaining bound: with independent units one forward a
        pick, instead of `width` (the full-size W8A8 run did not finish with `width` forwards per pick)."""
        picked: list[int] = []
        cost = 0
        cur = allq  # per-window NLL with `picked` restored
        bound = {i: float(gains[i, idx].sum()) / self.costs[i] for i in measured}
        while True:
            fit = sorted((i for i in measured if i not in picked and cost + self.costs[i] <= self.budget),
                         key=lambda i: -bound[i])
            best, best_v, best_nll, fresh = None, 0.0, None, 0
            for i in fit:
                if fresh >= max(1, width) or best_v >= bound[i]:  # (best_v starts at 0: only positive gains pick)
                    break
                nll = allq - gains[i] if not picked else self._restored_nll(q, (*picked, i))
                bound[i] = v = float((cur - nll)[idx].sum()) / self.costs[i]
                fresh += 1
                if v > best_v:
                    best, best_v, best_nll = i, v, nll
            if best is None:
                break
            picked.append(best)
            cost += self.costs[best]
            cur = best_nll
        return [m for i in sorted(picked) for m in self.units[i]]

    def _restored_nll(self, q, units: tuple[int, ...]) -> torch.Tensor:
        """Per-window NLL on all windows with these units restored (each set measured once)."""
        key = frozenset(units)
        if key not in self.greedy_nll:
            self.say(f"selection: greedy, all quantized but {len(key)} units "
                     f"({', '.join(self.units[units[-1]])} last)")
            with q.restored([m for i in sorted(key) for m in self.units[i]]):
                self.greedy_nll[key] = self.nll(self.windows)
        return self.greedy_nll[key]

    def choose(self, values: list[float]) -> list[str]:
        return knapsack_linears(values, self.units, self.budget, self.costs)

    def cross_validate(self, rule: str, chooser, base: torch.Tensor, allq: torch.Tensor) -> dict[str, Any]:
        """The rule's out-of-sample recovery: each fold scored by the choice made from the other folds."""
        mixed_sum, per_fold, fold_layers, fold_nll = 0.0, [], [], []
        per_window = self.tokens // self.n
        for f, part in enumerate(self.parts):
            chosen = chooser([w for w in range(self.n) if w not in part])
            fold_layers.append(chosen)
            self.say(f"selection: {rule}, fold {f + 1}/{len(self.parts)}: {len(chosen)} linears chosen from the "
                     "other folds")
            s = self._restored_sum(chosen, part)
            mixed_sum += s
            fold_nll.append(s)
            tok = len(part) * per_window
            per_fold.append(recovered_fraction(_ppl(float(base[part.start:part.stop].sum()), tok),
                                               _ppl(float(allq[part.start:part.stop].sum()), tok), _ppl(s, tok)))
        self.evaluations += 1
        cv = recovered_fraction(_ppl(float(base.sum()), self.tokens), _ppl(float(allq.sum()), self.tokens),
                                _ppl(mixed_sum, self.tokens))
        return {"rule": rule, "cv_recovered": cv, "per_fold": per_fold, "cv_ppl": _ppl(mixed_sum, self.tokens),
                "fold_layers": fold_layers, "fold_nll": fold_nll, "layers": chooser(list(range(self.n)))}

    def in_sample(self, best: dict[str, Any] | None, allq: torch.Tensor) -> float:
        """Perplexity on all windows with the final choice restored (flatters it: it was chosen on them)."""
        if best is None:
            return _ppl(float(allq.sum()), self.tokens)
        self.say(f"selection: {best['rule']} on all {self.n} windows: {len(best['layers'])} linears in FP16 "
                 "(in-sample score)")
        self.evaluations += 1
        return _ppl(self._restored_sum(best["layers"], range(self.n)), self.tokens)

    def set_results(self, layers, scheme, measured, gains, allq, chosen) -> None:
        """Each layer's flag, and its unit's restore gain in perplexity where measured."""
        ppl_allq = _ppl(float(allq.sum()), self.tokens)
        for i in measured:
            g = float(gains[i].sum())
            if self.budget > 0:  # in perplexity: ppl(all quantized) - ppl(all quantized but this unit)
                for m in self.units[i]:
                    self.by_name[m].restore_gain = ppl_allq - _ppl(float(allq.sum()) - g, self.tokens)
        keep = set(chosen)
        label = precision_label(scheme)
        for e in layers:
            e.flag = "fp16" if e.name in keep else label

    def summary(self, base, allq, mixed, best, measured, method: str) -> dict[str, Any]:
        """The `ppl` record of sensitive_layers.json (see quantkit.sensitivity.io); method: what quantized."""
        ppl_base, ppl_allq = _ppl(float(base.sum()), self.tokens), _ppl(float(allq.sum()), self.tokens)
        expected = None
        if best is not None:
            expected = {
                "recovered": best["cv_recovered"],
                "per_fold": best["per_fold"],
                "folds": len(self.parts),
                "windows": self.n,
                "seqlen": int(self.windows.shape[1]),
                "how": (f"{len(self.parts)}-fold cross-validation over {self.n} calibration windows: each window "
                        f"scored by the choice rule '{best['rule']}' applied to the other folds only; the gap of the "
                        f"model quantized with {method}; held-out text never read"),
            }
        return {
            "baseline": ppl_base, "all_quantized": ppl_allq, "mixed": mixed, "method": method,
            "recovered": recovered_fraction(ppl_base, ppl_allq, mixed), "rule": best["rule"] if best else None,
            "rule_why": best["why"] if best else None,
            "evaluations": self.evaluations, "budget": self.budget,
            "fp16_linears": len(best["layers"]) if best else 0, "units": len(self.units),
            "measured_units": len(measured) if self.budget > 0 else 0, "expected": expected,
            "selection_windows": self.n, "selection_seqlen": int(self.windows.shape[1]),
        }

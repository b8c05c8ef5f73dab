"""The whole scan: layer-wise measurement, thresholds (fixed or calibrated), optional ground truth."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from quantkit.recipe import Scheme
from quantkit.sensitivity.metrics import DEFAULT_BINS
from quantkit.sensitivity.select import DEFAULT_FOLDS
from quantkit.sensitivity.scan import MOST_FLAGGED, STAT_TOKENS, ScanReport, Thresholds, apply_thresholds, scan_layers
from quantkit.sensitivity.weights import method_weights


def run_scan(
    model,
    input_ids: torch.Tensor,
    scheme: Scheme,
    *,
    thresholds: Thresholds = Thresholds(),
    target_fraction: float | None = None,
    measure_ppl: bool = False,
    eval_windows: torch.Tensor | None = None,
    select_windows: torch.Tensor | None = None,
    folds: int = DEFAULT_FOLDS,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    eval_batch_size: int = 4,
    ignore: Sequence[str] = ("lm_head",),
    bins: int = DEFAULT_BINS,
    stat_tokens: int | None = STAT_TOKENS,
    shortlist: int | None = None,
    greedy: int | None = None,
    fisher_windows: int = 0,
    seed: int = 0,
    source: dict | None = None,
    calibration: dict | None = None,
    on_block: Callable[[int, int, str, str], None] | None = None,
    on_step: Callable[[str], None] | None = None,
    stream=None,
    activations: str = "device",
    method: str = "rtn",
    method_options: dict | None = None,
    cross_fit: bool | None = None,
) -> ScanReport:
    """Scan `model` on `input_ids` (samples, seqlen) for `scheme`; the model is left unchanged.

    target_fraction: choose at most this share of linears (whole fused units) to keep in FP16 instead of
    using `thresholds`, from `select_windows` (calibration text, never the held-out text) with `folds`-fold
    cross-validation (`quantkit.sensitivity.select`).
    measure_ppl: also measure each layer's held-out perplexity change alone (needs eval_windows).
    stat_tokens: token rows per linear for the output statistics (None = all); shortlist: units whose
    restore gain and alone damage the selection measures (None = all, 0 = none); greedy: the selection also tries its "greedy"
    rule, re-measuring this many candidates per pick (None = not tried); fisher_windows: the first N calibration
    samples get a forward + backward pass for the gradient-weighted metric (0 = off); with target_fraction
    the metric is measured per selection window instead (any N > 0 turns it on), so the folds keep it apart.
    stream, activations: for the layer-wise pass (`scan_layers`); a streamed model allows none of the
    steps that run the whole model (target_fraction, measure_ppl, fisher_windows, a method other than rtn).
    method, method_options: what "quantized" means everywhere (quantkit.sensitivity.weights): "rtn" (the
    scheme's round-to-nearest) or "gptq" (GPTQ with these recipe-stage options, run once on `input_ids`
    first), so that the gains and the expected recovery refer to the model the file will be used with.
    cross_fit (a method other than rtn, with target_fraction): the method also runs once per cross-validation
    fold on the calibration samples that share no text with that fold's selection windows, and the selection
    measures each window with its fold's weights (quantkit.sensitivity.select: "Cross-fitting").  None (the
    default): on for a method other than rtn with target_fraction and without greedy, where every fold keeps
    enough samples (else a report warning) and some fold's windows share text with the samples (else it would
    change nothing); True: as asked, or a usage error.
    """
    _check_request(target_fraction, select_windows, measure_ppl, eval_windows, fisher_windows, stream, method)
    asked = cross_fit
    cross_fit = resolve_cross_fit(cross_fit, method, target_fraction, greedy)
    fold_parts = fold_keep = None
    notes: list[str] = []
    if cross_fit:
        from quantkit.sensitivity.select import cv_folds

        fold_parts = cv_folds(int(select_windows.shape[0]), folds)  # the selection's folds, cut once
        fold_keep = _fold_samples(input_ids, select_windows, fold_parts, required=asked is True)
        if fold_keep is None or (asked is None and all(bool(k.all()) for k in fold_keep)):
            # by default: cross-fit only where it can, and where the method saw some fold's window text
            if fold_keep is None:
                notes.append("cross-fitting skipped: too few calibration samples share no text with a fold's "
                             "selection windows (the expected recovery may run high; more --calib text fixes it)")
            cross_fit, fold_parts, fold_keep = False, None, None
    t0 = time.perf_counter()
    if method != "rtn" and on_step is not None:
        on_step(f"{method}: quantizing every linear once (the weights the scan measures against)")
    weights = method_weights(model, input_ids, scheme, method, method_options, device=device, batch_size=batch_size,
                             ignore=ignore, on_block=on_block)
    layers = scan_layers(
        model, input_ids, scheme, device=device, batch_size=batch_size, ignore=ignore, bins=bins, seed=seed,
        stat_tokens=stat_tokens, on_block=on_block, stream=stream, activations=activations, weights=weights,
    )
    fold_weights = None
    if cross_fit:
        fold_weights = _fold_weights(model, input_ids, scheme, method, method_options, fold_keep, device,
                                     batch_size, ignore, on_block, on_step)
    fisher_rows = None
    if fisher_windows > 0:
        fisher_rows = _measure_fisher(model, layers, scheme, input_ids, fisher_windows, target_fraction,
                                      select_windows, device, on_step, weights, fold_parts, fold_weights)
    report = ScanReport(
        layers=layers, scheme=scheme, thresholds=thresholds, source=dict(source or {}),
        calibration=dict(calibration or {}), bins=bins, method=weights.record(),
        warnings=list(weights.warnings) + notes,
    )
    unscored = _unscored_experts(model, layers, ignore)
    if unscored:
        report.warnings.append(
            f"{len(unscored)} MoE expert linear(s) saw no calibration tokens and have no scores (e.g. {unscored[0]}); "
            "they are never flagged: give more --samples to route tokens to every expert"
        )
    report.calibration.setdefault("batch_size", batch_size)
    report.calibration["stat_tokens"] = stat_tokens
    report.calibration["fisher_windows"] = fisher_windows
    report.seconds = time.perf_counter() - t0  # the scan proper, without perplexity work
    if target_fraction is None:
        _apply_fixed(report, layers, thresholds, scheme)
    if target_fraction is None and not measure_ppl:
        return report
    dev = torch.device(device)
    home = next(model.parameters()).device
    try:
        if target_fraction is not None:
            _select(report, model, layers, scheme, select_windows, target_fraction, folds, dev, eval_batch_size,
                    shortlist, fisher_rows, on_step, weights, greedy, input_ids, fold_weights)
        if measure_ppl:
            _measure_ppl(report, model, layers, scheme, eval_windows, dev, eval_batch_size, on_step, weights)
    finally:
        model.to(home)  # perplexity runs move the whole model to the device; leave it where it was
    return report


def _check_request(target_fraction, select_windows, measure_ppl, eval_windows, fisher_windows, stream,
                   method) -> None:
    from quantkit.errors import UsageError
    from quantkit.sensitivity.weights import check_method

    check_method(method)

    if target_fraction is not None and select_windows is None:
        raise UsageError("--target-fraction needs selection windows from the calibration text (select_windows)")
    if measure_ppl and eval_windows is None:
        raise UsageError("--measure-ppl needs held-out windows (eval_windows)")
    if stream is not None and (target_fraction is not None or measure_ppl or fisher_windows > 0):
        raise UsageError("--target-fraction, --measure-ppl and --fisher-windows run the whole model: "
                         "load it without --stream")
    if stream is not None and method != "rtn":
        raise UsageError(f"--method {method} quantizes the model in memory before the scan: load it without --stream")


def resolve_cross_fit(cross_fit: bool | None, method: str, target_fraction, greedy) -> bool:
    """Whether the scan cross-fits: asked for (True; refused where it cannot be done), or by default (None) for a
    calibrated method's --target-fraction selection without --greedy."""
    if cross_fit is None:
        return method != "rtn" and target_fraction is not None and not greedy
    if cross_fit:
        check_cross_fit(method, target_fraction, greedy)
    return bool(cross_fit)


def check_cross_fit(method, target_fraction, greedy) -> None:
    from quantkit.errors import UsageError
    from quantkit.sensitivity.select import GREEDY_WITH_CROSS_FIT

    if method == "rtn":
        raise UsageError("--cross-fit refits a calibrated method per fold; rtn fits nothing: add --method gptq")
    if target_fraction is None:
        raise UsageError("--cross-fit is for the --target-fraction selection; pass --target-fraction 0.10")
    if greedy:
        raise UsageError(GREEDY_WITH_CROSS_FIT)


# a fold's method run needs at least this share of the calibration samples apart from its windows
CROSS_FIT_MIN_SAMPLES = 0.25


def _fold_samples(input_ids, select_windows, parts, required: bool):
    """Per fold, the calibration samples sharing no text with its selection windows (bool masks); too few for
    some fold: a usage error when cross-fitting was asked for, else None."""
    from quantkit.calib.data import samples_apart
    from quantkit.errors import UsageError

    keeps = []
    for f, part in enumerate(parts):
        keep = samples_apart(input_ids, select_windows[part.start : part.stop])
        n = int(keep.sum())
        if n < max(1, CROSS_FIT_MIN_SAMPLES * input_ids.shape[0]):
            if not required:
                return None
            raise UsageError(
                f"--cross-fit: only {n} of {input_ids.shape[0]} calibration samples share no text with fold "
                f"{f + 1}'s selection windows; use fewer --select-windows, or more calibration text (--calib)")
        keeps.append(keep)
    return keeps


def _fold_weights(model, input_ids, scheme, method, method_options, fold_keep, device, batch_size, ignore,
                  on_block, on_step):
    """One method run per selection fold, each on the calibration samples sharing no text with its windows."""
    out = []
    for f, keep in enumerate(fold_keep):
        n = int(keep.sum())
        if on_step is not None:
            on_step(f"{method}: fold {f + 1}/{len(fold_keep)} on the {n} of {input_ids.shape[0]} calibration samples "
                    "that share no text with its selection windows")
        out.append(method_weights(model, input_ids[keep], scheme, method, method_options, device=device,
                                  batch_size=min(batch_size, n), ignore=ignore, on_block=on_block))
    return out


def _measure_fisher(model, layers, scheme, input_ids, fisher_windows, target_fraction, select_windows, device,
                    on_step, weights, fold_parts=None, fold_weights=None) -> dict[str, torch.Tensor] | None:
    """Set each layer's gradient-weighted error; returns its per-window rows when the selection needs them
    (cross-fitted: each fold's windows measured against its fold's weights)."""
    from quantkit.sensitivity.fisher import fisher_scores

    # with --target-fraction: per selection window, so that the cross-validation folds keep it apart
    ids = select_windows if target_fraction is not None else input_ids[:fisher_windows]
    if on_step is not None:
        on_step(f"gradient-weighted error: forward + backward on {len(ids)} windows")
    names = [e.name for e in layers]
    if fold_weights is None:
        rows = fisher_scores(model, ids, scheme, names, device=device, per_window=True, weights=weights)
    else:
        per = [fisher_scores(model, ids[p.start : p.stop], scheme, names, device=device, per_window=True, weights=w)
               for p, w in zip(fold_parts, fold_weights)]
        rows = {n: torch.cat([r[n] for r in per]) for n in names}
    for e in layers:
        e.fisher = float(rows[e.name].mean())
    return rows if target_fraction is not None else None


def _apply_fixed(report: ScanReport, layers, thresholds: Thresholds, scheme: Scheme) -> None:
    flagged = apply_thresholds(layers, thresholds, scheme)
    if layers and len(flagged) > MOST_FLAGGED * len(layers):
        report.warnings.append(
            f"the fixed thresholds flag {len(flagged)} of {len(layers)} linears for FP16: they do not fit this "
            "model; use --target-fraction 0.10 (or raise --kl / --r / --energy)"
        )


def _select(report: ScanReport, model, layers, scheme, select_windows, target_fraction, folds, dev,
            eval_batch_size, shortlist, fisher_rows, on_step, weights, greedy=None, input_ids=None,
            fold_weights=None) -> None:
    from quantkit.calib.data import text_overlap
    from quantkit.sensitivity.select import select_fp16

    sel = select_fp16(
        model, layers, scheme, select_windows, target_fraction, folds=folds, device=dev,
        batch_size=eval_batch_size, shortlist=shortlist, fisher=fisher_rows, on_step=on_step, weights=weights,
        greedy=greedy, fold_weights=fold_weights,
    )
    if weights.method != "rtn" and sel.ppl.get("expected") and input_ids is not None:
        # a method fit to its calibration samples (GPTQ) does better on that text than on unseen text, so an
        # expectation measured on windows it was fit to runs high: say how much of theirs it was fit to
        if fold_weights is None:
            sel.ppl["expected"]["method_fit_overlap"] = text_overlap(select_windows, input_ids)
        else:  # by construction each fold's weights saw none of its windows' text
            sel.ppl["expected"]["method_fit_overlap"] = 0.0
        sel.ppl["expected"]["cross_fit"] = fold_weights is not None
    report.thresholds = Thresholds(None, None, None)  # the choice is an explicit list of units
    report.search, report.ppl, report.selection_data = sel.candidates, sel.ppl, sel.measurements
    report.mode, report.target_fraction = "target-fraction", target_fraction
    if not sel.chosen:
        report.warnings.append(
            f"--target-fraction {target_fraction} allows no layer of {len(layers)} in FP16; nothing flagged"
        )


def _measure_ppl(report: ScanReport, model, layers, scheme, eval_windows, dev, eval_batch_size, on_step,
                 weights) -> None:
    from quantkit.sensitivity.calibrate import correlations, measure_layer_ppl

    def step(i, n, name):
        if on_step is not None:
            on_step(f"({i + 1}/{n}) perplexity with only {name} quantized")

    base = measure_layer_ppl(model, layers, scheme, eval_windows, device=dev, batch_size=eval_batch_size, on_step=step,
                             weights=weights)
    report.correlations = correlations(layers)
    # the held-out baseline, apart from the selection's (calibration-text) perplexities
    report.ppl = {**(report.ppl or {}), "heldout_baseline": base, "heldout_windows": int(eval_windows.shape[0]),
                  "heldout_seqlen": int(eval_windows.shape[1])}


def _unscored_experts(model, layers, ignore) -> list[str]:
    """Expert linears the scan could not score (no token routed to them), in model order."""
    from quantkit.calib.pipeline import is_ignored
    from quantkit.models.adapter import ModelAdapter

    scored = {e.name for e in layers}
    return [n for n in ModelAdapter.for_model(model).all_linears() if n not in scored and not is_ignored(n, ignore)]

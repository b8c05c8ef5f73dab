"""`quantkit plan`: peak host and device memory of a run, estimated from the model's config alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.options import (BatchOpt, BitsOpt, DeviceOpt, DtypeOpt, GroupSizeOpt, JsonOpt, ModelOpt, SamplesOpt,
                                  SeqlenOpt, ShardSizeOpt, StreamOpt, SymOpt)
from quantkit.cli.ui import console, handle_errors

RecipeFileOpt = Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML file (scheme, stages, ignore).")]
MethodOpt = Annotated[str, typer.Option("--method", help="Single-stage recipe with this method (without --recipe).")]


def _load_recipe_file(path: Path):
    from quantkit.methods.base import load_recipe

    return load_recipe(path)


@handle_errors
def plan_cmd(
    model: ModelOpt = None,
    recipe: RecipeFileOpt = None,
    method: MethodOpt = "rtn",
    bits: BitsOpt = 4,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = True,
    samples: SamplesOpt = 64,
    seqlen: SeqlenOpt = 512,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = None,
    device_memory: Annotated[
        Optional[float], typer.Option("--device-memory", help="GiB free on the device (plan a GPU run from any machine).")
    ] = None,
    host_memory: Annotated[
        Optional[float], typer.Option("--host-memory", help="GiB of host memory to plan for (default: what is available now).")
    ] = None,
    shape: Annotated[
        Optional[str], typer.Option("--shape", help="Plan a named model shape instead of --model: llama3-8b, llama3-70b, ...")
    ] = None,
    stream: StreamOpt = None,
    shard_size: ShardSizeOpt = 2.0,
) -> None:
    """Estimate peak host/device memory of quantizing MODEL (reads only its config) and whether it fits."""
    from quantkit.api import CalibConfig, check_arch, needs_calibration, streams
    from quantkit import validate as chk
    from quantkit.models.loading import resolve_device, resolve_dtype
    from quantkit.plan import plan_run

    chk.check_samples_batch(samples, batch_size)
    chk.check_seqlen("--seqlen", seqlen)
    chk.check_dtype(dtype)
    chk.check_float("--device-memory", device_memory, min=0, max=2**30, min_open=True, note=" GiB")
    chk.check_float("--host-memory", host_memory, min=0, max=2**30, min_open=True, note=" GiB")
    chk.check_float("--shard-size", shard_size, min=0, max=2**20, min_open=True, note=" GiB")
    if shape is not None and model is not None:
        raise chk.OptionError("give --model or --shape, not both")
    chk.check_output_file("--json", json_out)
    if device_memory is not None and device.startswith("cuda"):
        dev = device  # planning for a GPU this machine may not have
    else:
        dev = resolve_device(device)
    resolve_dtype(dtype, dev)  # validates the name
    rec = _recipe(recipe, method, bits, group_size, sym)
    calib = CalibConfig(samples=samples, seqlen=seqlen, batch_size=batch_size)
    cfg = _config(model, shape)
    check_arch(cfg, rec)
    if needs_calibration(rec):  # a data-free recipe (RTN) never reads --seqlen tokens
        chk.check_seqlen("--seqlen", seqlen, cfg)
    avail = None if device_memory is None else int(device_memory * 2**30)
    host = None if host_memory is None else int(host_memory * 2**30)
    quantkit_ckpt = model is not None and Path(model).is_dir() and (Path(model) / "quantkit.json").is_file()
    p = plan_run(cfg, rec, calib, dev, dtype=dtype, device_available=avail, host_available=host, stream=stream,
                 can_stream=streams(rec) and not quantkit_ckpt, shard_bytes=max(1, int(shard_size * 2**30)))
    _print_plan(p, dev)
    if json_out is not None:
        import json

        from quantkit.run import write_text_atomic

        write_text_atomic(json_out, json.dumps(p.to_dict(), indent=2) + "\n")


def _recipe(path: Optional[Path], method: str, bits: int, group_size: Optional[int], sym: bool):
    """The --recipe file, else a one-stage recipe of --method with the weight flags."""
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    if path is not None:
        return _load_recipe_file(path)
    return Recipe(Scheme(QuantArgs(bits=bits, group_size=group_size, symmetric=sym)), (Stage(method),))


def _config(model: Optional[str], shape: Optional[str]) -> dict:
    """The config dict of --shape (a named shape) or of --model (read without its weights)."""
    from quantkit import validate as chk
    from quantkit.errors import short_repr
    from quantkit.models.loading import check_source
    from quantkit.plan import model_config

    if shape is None:
        check_source(model)
        return model_config(model)
    from quantkit.models.random import SHAPES

    if shape not in SHAPES:
        raise chk.OptionError(f"unknown --shape {short_repr(shape)}; known: {', '.join(sorted(SHAPES))}")
    return dict(SHAPES[shape])


def _print_plan(p, dev: str) -> None:
    """The plan as a table: each part, the peaks against what is available, the mode, the advice."""
    from rich.table import Table

    t = Table(title="memory plan (estimate from config)", show_header=False)
    for k, v in p.host_parts.items():
        t.add_row(f"host · {k}", f"{v / 2**30:.2f} GiB")
    t.add_row("[bold]host peak[/]", f"{p.host_peak / 2**30:.2f} GiB"
              + (f" of {p.host_available / 2**30:.2f} GiB available" if p.host_available else ""))
    for k, v in p.device_parts.items():
        t.add_row(f"{dev} · {k}", f"{v / 2**30:.2f} GiB")
    if dev != "cpu":
        t.add_row(f"[bold]{dev} peak[/]", f"{p.device_peak / 2**30:.2f} GiB"
                  + (f" of {p.device_available / 2**30:.2f} GiB free" if p.device_available else ""))
    t.add_row("mode", "streamed: blocks read from the shards one at a time" if p.streamed else "whole model in host memory")
    if p.activations != "device" or dev != "cpu":
        t.add_row("calibration activations", {"device": f"on {dev}", "host": "pinned host memory",
                                              "disk": "on disk, one batch at a time in memory"}[p.activations])
    t.add_row("fits", "[green]yes[/]" if p.fits else "[red]no[/]")
    for a in p.advice:
        t.add_row("[yellow]try[/]", a)
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)

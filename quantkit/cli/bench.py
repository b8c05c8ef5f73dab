"""`quantkit bench`: prefill and decode speed of a checkpoint (or a random model of a named shape) on the
runtime, next to the runtime's own BF16 path and transformers BF16, measured in the same process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.runtime_options import FallbackOpt, LatentCacheOpt, RtDeviceOpt
from quantkit.cli.ui import console, fail, handle_errors, status


def parse_batches(value: str) -> list[int]:
    from quantkit.errors import UsageError

    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch takes comma-separated positive integers, got {value[:40]!r}") from None
    if not out or any(b < 1 or b > 4096 for b in out):
        raise UsageError(f"--batch takes comma-separated integers in 1..4096, got {value[:40]!r}")
    return out


def _scheme(name: str, group_size: Optional[int]):
    import dataclasses

    from quantkit.recipe import PRESETS
    from quantkit.validate import check_choice

    check_choice("--scheme", name, PRESETS)
    s = PRESETS[name]
    if group_size is not None:
        s = dataclasses.replace(s, weights=dataclasses.replace(s.weights, group_size=group_size or None))
    return s


@handle_errors
def bench_cmd(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint dir written by quantkit (or use --shape).")] = None,
    shape: Annotated[Optional[str], typer.Option("--shape", help="Random-weight model of a named shape instead: llama3-8b, llama3-1b, tiny.")] = None,
    scheme: Annotated[str, typer.Option("--scheme", help="With --shape: W4A16, W8A16, W8A8, W8A8C8 or W4A4KV4 (RTN).")] = "W4A16",
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="With --shape: weight group size (0 = per-channel).")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="With --shape: this many decoder layers (quick runs).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1",
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens per sample.")] = 512,
    gen_len: Annotated[int, typer.Option("--gen-len", help="Tokens generated per sample.")] = 256,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Also time the runtime's BF16 path and transformers BF16.")] = True,
    fallback: FallbackOpt = False,
    mixed_fraction: Annotated[float, typer.Option("--mixed-fraction", help="With --shape: also time this share of linears kept FP16 (sensitive, with shadows).")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompts (and weights).")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write every row here as JSON.")] = None,
    latent_cache: LatentCacheOpt = False,
    device: RtDeviceOpt = "auto",
) -> None:
    """Prefill/decode speed on the runtime next to its own BF16 path and transformers (same process).

    Columns: tokens/s, ms per decode step, ratios to the runtime's float path and to transformers, peak GPU
    memory, weight and KV bytes, and the share of tokens the fallback monitor moved to FP16."""
    from quantkit.errors import UsageError

    batches = parse_batches(batch)
    if prompt_len < 1 or gen_len < 2:
        raise UsageError("--prompt-len must be >= 1 and --gen-len >= 2")
    if (checkpoint is None) == (shape is None):
        fail("give a checkpoint dir or --shape NAME (one of them)")
    if layers is not None and layers < 1:
        raise UsageError("--layers must be >= 1")
    if latent_cache and shape is not None:
        raise UsageError("--latent-cache is for DeepSeek-V2/V3 checkpoints; the --shape models are Llama-shaped")
    if not 0 <= mixed_fraction < 1:
        raise UsageError("--mixed-fraction must be in [0, 1)")
    from quantkit.validate import check_device, check_output_file

    check_output_file("--json", json_out)
    check_device(device)
    sch = _scheme(scheme, group_size) if shape is not None else None
    if shape is not None:
        from quantkit.models.random import SHAPES

        if shape not in SHAPES:
            raise UsageError(f"unknown --shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    from quantkit import api

    rows = api.bench(checkpoint=checkpoint, shape=shape, scheme=sch, layers=layers, batches=batches,
                     prompt_len=prompt_len, gen_len=gen_len, baselines=baselines, fallback=fallback,
                     mixed_fraction=mixed_fraction, seed=seed, device=device, latent_cache=latent_cache,
                     on_status=status)
    from rich.table import Table

    t = Table(title=f"runtime bench · prompt {prompt_len} · gen {gen_len}")
    for col in ("row", "batch", "prefill tok/s", "decode tok/s", "ms/step", "x float rt", "x HF",
                "peak GiB", "weights GiB", "KV MiB", "fallback"):
        t.add_column(col)
    for r in rows:
        base = next((x for x in rows if x["role"] == "runtime-float" and x["batch"] == r["batch"]), None)
        hf = next((x for x in rows if x["role"] == "transformers" and x["batch"] == r["batch"]), None)
        ratio = (lambda b: f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}" if b and b["decode_tok_s"] else "")
        t.add_row(r["name"], str(r["batch"]), f"{r['prefill_tok_s']:,.0f}", f"{r['decode_tok_s']:,.1f}",
                  f"{r['ms_per_step']:.2f}", ratio(base), ratio(hf),
                  "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}",
                  "" if r["weight_bytes"] is None else f"{r['weight_bytes'] / 2**30:.2f}",
                  "" if r["kv_bytes"] is None else f"{r['kv_bytes'] / 2**20:,.1f}",
                  "" if r["fallback_rate"] is None else f"{r['fallback_rate']:.1%}")
    console.print(t)
    if json_out is not None:
        from quantkit.run import write_text_atomic

        write_text_atomic(json_out, json.dumps({"rows": rows}, indent=2) + "\n")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)

"""`quantkit inspect DIR [--verify]`: what a checkpoint holds, and whether its files are intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantkit.cli.ui import console, fail, handle_errors
from quantkit.export.ct_transform import describe_online, describe_transform_config


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _describe_weights(w: dict | None) -> str:
    if not w:
        return "unquantized"
    g = "per-channel" if w.get("group_size") in (None, -1) else f"group {w['group_size']}"
    return f"W{w['num_bits']} {g} {'sym' if w.get('symmetric') else 'asym'}"


def _rows(s: dict) -> list[tuple[str, str]]:
    """The summary as (label, value) rows a person reads top to bottom."""
    version = f" (format version {s['version']})" if s.get("version") and s["version"] != s["format"] else ""
    rows = [("format", f"{s['quant_method']} · {s['format']}{version}")]
    for g in s["groups"]:
        acts = " + A8 activations" if g.get("input_activations") else ""
        rows.append((g["name"], f"{_describe_weights(g['weights'])}{acts} · {g['n_targets']} linears"))
    ignore = s["ignore"]
    rows.append(("left unquantized", ", ".join(ignore) if len(ignore) <= 4 else f"{len(ignore)} linears"))
    if s.get("kv_cache_scheme"):
        rows.append(("kv cache", str(s["kv_cache_scheme"])))
    rows.append(("quantized tensors", f"{_mib(s['quantized_bytes'])} ({s['n_quantized_linears']} linears)"))
    rows.append(("other tensors", _mib(s["unquantized_bytes"])))
    lb = s.get("linear_bytes")
    if lb and lb.get("all_fp16"):
        rows.append(
            ("linear memory",
             f"quantized {_mib(lb['quantized'])} + kept in float {_mib(lb['float'])} vs all-FP16 "
             f"{_mib(lb['all_fp16'])} (saving {lb['saving']:.1%})")
        )
    sens = s.get("sensitivity")
    if sens:
        rows.append(("kept FP16 by scan", f"{len(sens.get('fp16', []))} of {sens.get('n_linears', '?')} linears "
                     f"({sens.get('source_file', '?')})"))
    sh = s.get("shadow")
    if sh:
        rows.append(("shadow copies", f"{len(sh.get('modules', {}))} quantized linears in {sh.get('file')}"))
    if s.get("online_rotations"):
        rows.append(("online rotations", describe_online(s["online_rotations"])))
    for line in describe_transform_config(s.get("transform_config") or {}):
        rows.append(("transform", line))
    rows.append(("on disk", _mib(s["total_bytes"])))
    m = s.get("manifest")
    if m:
        rows.append(("written by", f"quantkit {m['quantkit_version']} at {m['created']} (manifest v{m['format_version']})"))
    else:
        rows.append(("written by", "not a quantkit checkpoint (no quantkit.json): read from config.json and the "
                                   "safetensors headers; its files cannot be verified"))
    src = s.get("source") or {}
    if src:
        where = src.get("id") or src.get("name") or src.get("path", "?")
        rows.append(("source model", f"{where} [{src.get('kind')}, {src.get('dtype', '?')}]"))
        rows.append(("source fingerprint", str(src.get("fingerprint", "?"))[:16]))
    rec = s.get("recipe")
    if rec:
        rows.append(("recipe", " → ".join(st["method"] for st in rec["stages"])))
    if s.get("resolved_options"):
        from quantkit.methods.base import describe_resolved
    for r in s.get("resolved_options") or []:
        rows.append((f"stage {r['stage']} auto", f"{r['method']}: {describe_resolved(r)}"))
    for w in s.get("warnings") or []:
        rows.append(("[yellow]warning[/]", w))
    return rows


@handle_errors
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory written by quantkit.")],
    verify: Annotated[bool, typer.Option("--verify", help="Check every file's sha256 against the manifest.")] = False,
) -> None:
    """Summarize a checkpoint (format, scheme, sizes, source) and optionally verify its hashes."""
    from rich.markup import escape
    from rich.table import Table

    from quantkit.export.manifest import MANIFEST_NAME, verify_checkpoint
    from quantkit.export.summary import read_checkpoint_summary

    if not path.is_dir():
        fail(f"{path} is not a directory; pass a checkpoint directory written by quantkit")
    if verify and not (path / MANIFEST_NAME).is_file():
        fail(f"{path} is not a quantkit checkpoint (no {MANIFEST_NAME}), so its files cannot be verified; "
             f"`quantkit inspect {path}` without --verify reads its config.json and safetensors headers")
    # Verify first: a damaged file is named as an integrity problem, not tripped over while summarizing.
    problems = verify_checkpoint(path) if verify else []
    if problems:
        for p in problems:
            console.print(f"[red]✗[/] {p}", highlight=False)
        fail(f"{len(problems)} integrity problem(s) in {path}, e.g. {problems[0]}; do not serve this checkpoint", code=1)
    summary = read_checkpoint_summary(path)
    t = Table(title=str(path), show_header=False)
    for k, v in _rows(summary):
        t.add_row(k, escape(v))
    console.print(t)
    if verify:
        console.print("[green]✓[/] every file matches the manifest's sha256")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)

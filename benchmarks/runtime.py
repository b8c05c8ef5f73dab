"""Runtime speed (issue 17): Llama-3-8B-shaped random weights on the quantkit runtime, next to the runtime's
own BF16 path and transformers BF16, all in one process; plus decode attention at long context.

    python benchmarks/runtime.py --device cuda --json runtime.json --md runtime.md
    # a quick run of the same code (4 layers, short generation) to check it end to end:
    python benchmarks/runtime.py --device cuda --layers 4 --gen-len 32 --att-context 4096
    # CPU smoke test (tiny shape, torch references):
    python benchmarks/runtime.py --device cpu --shape tiny --prompt-len 32 --gen-len 8 --att-context 256 --att-batch 1

Rows (prompt --prompt-len, --gen-len new tokens, greedy, no EOS stop, seeded random prompts):

* BF16 runtime at batch 1 and --batch-big (same engine, dense linears, float KV cache, CUDA graphs);
* transformers `generate` BF16 at both batches (its default cache and SDPA attention, no compile);
* W4A16 group 128 (RTN) at batch 1 and --batch-big;
* W8A8C8 (RTN W8 per-channel, A8 per-token, INT8 KV per-channel static) at both batches, then with
  the fallback monitor on (calibrated on random tokens, as the prompts are), then as a mixed model with
  10% of the linears (whole blocks) kept FP16 with quantized shadows.

Then decode attention alone (--att-context keys, Llama-3-8B heads: 32 query / 8 KV heads of 128) at
batch --att-batch: the runtime's kernel on an INT8 cache (per-token scales; per-channel scales) and on
a BF16 cache, next to torch SDPA on BF16 (a CUDA graph of each, median of `do_bench_cudagraph`).

--chain-ab (sm_90+): the BF16 runtime, W4A16 and W8A8C8 rows with the runtime's decode-step PDL chain on, on with
the plain config entries (no CHAINED ones) and off, per batch in the order a b c c b a, each side's two runs pooled.

HBM roofline of W4A16 batch-1 decode: bytes one step must read (packed linears with scales, lm_head,
the KV cache at the mean context) over the measured device-to-device copy bandwidth (bytes read +
written); the table gives the measured step time against that floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch


def _log(*a):
    print(*a, flush=True)


def _attention_bench(device, B, T, warm=25, rep=200):
    """us per call of decode attention at context T: ours (INT8 token, INT8 channel, BF16) and SDPA BF16."""
    import triton

    from quantkit.kernels.attention import decode_attention
    from quantkit.quant import kv as kvq

    Hq, Hkv, D = 32, 8, 128
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, D, device=device, generator=g).bfloat16()
    k = torch.randn(B, Hkv, T, D, device=device, generator=g)
    v = torch.randn(B, Hkv, T, D, device=device, generator=g)
    lens = torch.full((B,), T, dtype=torch.int32, device=device)
    ks, vs = kvq.kv_scale(k, "token"), kvq.kv_scale(v, "token")
    kq_t, vq_t = kvq.quantize_kv(k, ks), kvq.quantize_kv(v, vs)
    ks_t, vs_t = ks[..., 0].contiguous(), vs[..., 0].contiguous()
    kc = kvq.static_scale(kvq.channel_amax(k))
    vc = kvq.static_scale(kvq.channel_amax(v))
    kq_c, vq_c = kvq.quantize_kv(k, kc.view(1, Hkv, 1, D)), kvq.quantize_kv(v, vc.view(1, Hkv, 1, D))
    kb, vb = k.bfloat16(), v.bfloat16()
    del k, v
    out = torch.empty(B, Hq, D, device=device, dtype=torch.bfloat16)
    qs = q.view(B, Hq, 1, D)
    cases = {
        "int8 per-token (ours)": lambda: decode_attention(q, kq_t, vq_t, lens, k_scale=ks_t, v_scale=vs_t, out=out),
        "int8 per-channel (ours)": lambda: decode_attention(q, kq_c, vq_c, lens, k_scale=kc, v_scale=vc, out=out),
        "bf16 (ours)": lambda: decode_attention(q, kb, vb, lens, out=out),
        "bf16 torch SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(qs, kb, vb, enable_gqa=True),
    }
    res = {}
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=rep)
        except Exception as e:  # a case that cannot be captured is timed eagerly
            _log(f"  {name}: graph timing failed ({type(e).__name__}); eager do_bench")
            ms = triton.testing.do_bench(fn, warmup=warm, rep=rep)
        res[name] = ms * 1e3
    kv_bytes = {"int8 per-token (ours)": 2 * (kq_t.numel() + ks_t.numel() * 4),
                "int8 per-channel (ours)": 2 * kq_c.numel(), "bf16 (ours)": 2 * kb.numel() * 2,
                "bf16 torch SDPA": 2 * kb.numel() * 2}
    return {n: {"us": us, "kv_bytes": kv_bytes[n]} for n, us in res.items()}


GEMM_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # fused qkv, o, fused gate/up, down


def chained_candidates(plain: dict) -> list:
    """The CHAINED configs a W4A16 M = 1 entry may carry, tried in the runtime: none, and the entry's one-launch
    half2 GEMV launched programmatically (PDL, with and without PREFETCH 2). Not PDL_CHAIN twins: they let the next
    launches in early, and in the runtime those sat on the SMs while the GEMV streamed (session 50: W4A16 batch 1
    1.848 against 1.740 ms a step with the chain off). An entry already launched programmatically has none."""
    if plain.get("BACKEND") != "gemv_h2" or plain.get("PDL") or plain.get("PACKED_X"):
        return [None]
    return [None, dict(plain, PDL=True), dict(plain, PDL=True, PREFETCH=2)]


def choose_chained(entries: dict, install, time_step, rounds: int = 2, margin: float = 0.003) -> dict:
    """Each M = 1 entry's CHAINED config chosen by the runtime's own decode step, one shape at a time (the others
    as already chosen): ``entries`` {(N, K): the plain entry}; ``install(N, K, chained)`` puts that choice in
    place; ``time_step()`` -> ms a step. Each candidate is timed ``rounds`` times, in the order a b c, c b a, ...;
    a candidate replaces none only where its mean beats none's by more than ``margin``. -> {(N, K): (choice or
    None, {candidate index: [ms, ...]})}."""
    chosen = {}
    for (N, K), plain in entries.items():
        cands = chained_candidates(plain)
        times: dict = {i: [] for i in range(len(cands))}
        if len(cands) > 1:
            for r in range(rounds):
                for i in (range(len(cands)) if r % 2 == 0 else reversed(range(len(cands)))):
                    install(N, K, cands[i])
                    times[i].append(time_step())
        mean = {i: sum(t) / len(t) for i, t in times.items() if t}
        best = min(mean, key=mean.get) if mean else 0
        if best and mean[best] > (1 - margin) * mean[0]:
            best = 0
        install(N, K, cands[best])
        chosen[(N, K)] = (cands[best], times)
    return chosen


def tune_chained(rt, time_step, rounds: int = 2, write: bool = False) -> dict:
    """``choose_chained`` on the W4A16 M = 1 entries a decode step of ``rt`` runs (on this GPU's config file),
    timing the step by ``time_step``; the winners stay in the in-process table, and with ``write`` go into the
    GPU's config file. -> {(1, N, K): the entry with its CHAINED choice (None: none)}."""
    from quantkit.kernels import wna16
    from quantkit.kernels._common import CHAINED, gpu_key, write_tuned

    gpu = gpu_key(torch.empty(1, device=rt.device))
    asked = []  # the (M, N, K) whose tuned W4A16 entries one eager decode step asks for
    table_get = wna16.CONFIGS.get
    rt.use_graphs, graphs = False, rt.use_graphs
    try:
        wna16.CONFIGS.get = lambda M, N, K, g: asked.append((M, N, K)) or table_get(M, N, K, g)
        wna16._PLANS.clear()
        rt.generate([[1, 2, 3]], max_new_tokens=2, sync_every_step=False)
    finally:
        del wna16.CONFIGS.get  # the class's method again
        rt.use_graphs = graphs
    shapes = sorted({(N, K) for M, N, K in asked if M == 1})
    entries = {}
    for N, K in shapes:
        cfg = wna16.CONFIGS.table.get((gpu, 1, N, K))
        if cfg is not None:
            entries[(N, K)] = {k: v for k, v in cfg.items() if k != CHAINED}

    def install(N, K, chained):
        wna16.CONFIGS.set(1, N, K, gpu, dict(entries[(N, K)], **({CHAINED: chained} if chained else {})))
        wna16._PLANS.clear()
        rt.drop_graphs()

    out = {}
    for (N, K), (choice, times) in choose_chained(entries, install, time_step, rounds).items():
        _log(f"chained {N}x{K}: " + "; ".join(f"{c if c else 'none'}: {', '.join(f'{v:.3f}' for v in times[i])} ms"
                                              for i, c in enumerate(chained_candidates(entries[(N, K)])) if times[i])
             + f" -> {choice if choice else 'none'}")
        out[(1, N, K)] = dict(entries[(N, K)], **{CHAINED: choice})
    if write:
        _log(f"configs: {len(out)} w4a16 entries (their CHAINED choice) -> {write_tuned(gpu, 'w4a16', out)}")
    return out


def tune_decode_gemms(M: int, device="cuda") -> dict:
    """For batch-M decode, time the tuned configs of the neighbouring M buckets (and the heuristic) for the
    W8A8 and W4A16 kernels on the Llama-3-8B shapes (CUDA graphs), keep the fastest in the in-process
    config tables, and return them (to be merged into quantkit/kernels/configs/<gpu>.json)."""
    import triton

    from quantkit.kernels import w8a8, wna16
    from quantkit.kernels._common import gpu_key, m_bucket

    chosen = {}
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, 14336, device=device, generator=g).bfloat16()
    for N, K in GEMM_SHAPES:
        xk = x[:, :K].contiguous()
        gpu = gpu_key(xk)
        q8 = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8)
        s8 = torch.rand(N, 1, device=device) * 1e-3 + 1e-4
        W8 = w8a8.prepack_w8a8(q8, s8)
        q4 = torch.randint(-8, 8, (N, K), device=device, dtype=torch.int8)
        W4 = wna16.prepack_wna16(q4, torch.rand(N, K // 128, device=device) * 1e-2 + 1e-3, None, 4,
                                 scale_dtype=torch.bfloat16)
        for name, cache, fn in (
            ("w8a8", w8a8.CONFIGS, lambda c: w8a8.w8a8_linear_triton(xk, W8.w, W8.scale, config=c)),
            ("w4a16", wna16.CONFIGS, lambda c: wna16.wna16_linear_triton(xk, W4.qw, W4.scales, None, None, 4, 128,
                                                                         N, K, config=c)),
        ):
            cands = []
            for b in (16, 64, m_bucket(M)):
                c = cache.table.get((gpu, b, N, K))
                if c is not None and c not in cands:
                    cands.append(c)
            d = cache.defaults(M, N, K)
            if d not in cands:
                cands.append(d)
            best = None
            for c in cands:
                try:
                    fn(c)
                    torch.cuda.synchronize()
                    us = triton.testing.do_bench_cudagraph(lambda: fn(c), rep=100) * 1e3
                except Exception as e:
                    _log(f"  tune {name} {N}x{K} {c}: failed ({type(e).__name__})")
                    continue
                _log(f"  tune {name} M={M} {N}x{K} {c}: {us:.1f} us")
                if best is None or us < best[0]:
                    best = (us, c)
            cache.set(M, N, K, gpu, best[1])
            chosen[f"{name} {gpu} M{m_bucket(M)} {N}x{K}"] = {"us": best[0], "config": best[1]}
    return chosen


def tune_attention(B: int, T: int, device="cuda") -> dict:
    """Decode-attention launch settings at batch B, context T (INT8 per-channel and BF16 caches): keep the
    fastest in kernels.attention.CONFIG and return all timings."""
    import triton

    from quantkit.kernels import attention as A
    from quantkit.quant import kv as kvq

    Hq, Hkv, D = 32, 8, 128
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, D, device=device, generator=g).bfloat16()
    k = torch.randn(B, Hkv, T, D, device=device, generator=g)
    lens = torch.full((B,), T, dtype=torch.int32, device=device)
    kc = kvq.static_scale(kvq.channel_amax(k))
    kq = kvq.quantize_kv(k, kc.view(1, Hkv, 1, D))
    kb = k.bfloat16()
    del k
    out = torch.empty(B, Hq, D, device=device, dtype=torch.bfloat16)
    res, best = {}, None
    for bn in (64, 128):
        for nw in (4, 8):
            for ns in (2, 3):
                for tp in (1056, 2112):
                    cfg = dict(block_n=bn, num_warps=nw, num_stages=ns, target_programs=tp)
                    tot = 0.0
                    try:
                        for kk, sc in ((kq, kc), (kb, None)):
                            fn = (lambda kk=kk, sc=sc: A.decode_attention(q, kk, kk, lens, k_scale=sc, v_scale=sc,
                                                                         out=out, **cfg))
                            fn()
                            torch.cuda.synchronize()
                            us = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
                            res[f"{cfg} {'int8' if sc is not None else 'bf16'}"] = us
                            tot += us
                    except Exception as e:
                        _log(f"  tune attention {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
                        continue
                    if best is None or tot < best[0]:
                        best = (tot, cfg)
    A.CONFIG.update(best[1])
    _log(f"  attention config: {best[1]}")
    return {"best": best[1], "timings_us": res}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--batch-big", type=int, default=32)
    ap.add_argument("--mixed-fraction", type=float, default=0.1)
    ap.add_argument("--att-context", type=int, default=32768)
    ap.add_argument("--att-batch", type=int, default=4)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: bf16,hf,w4,w8,monitor,mixed,att")
    ap.add_argument("--tune", action="store_true", help="first tune the decode GEMM configs at --batch-big and the "
                    "decode-attention launch settings (kept in-process and reported)")
    ap.add_argument("--chain-ab", action="store_true", help="also time the BF16 runtime, W4A16 and W8A8C8 rows with "
                    "the runtime's programmatic launch chain off (kernels._common.CHAIN_PDL), in the same process")
    ap.add_argument("--tune-chained", action="store_true", help="first choose the W4A16 M = 1 entries' CHAINED "
                    "configs (the config run inside a decode step's chain) by this runtime's batch-1 step time "
                    "(choose_chained); the rows then run the choice")
    ap.add_argument("--write-configs", action="store_true", help="with --tune-chained: write the choices into "
                    "quantkit/kernels/configs/<gpu>.json")
    ap.add_argument("--eager-replay-ab", action="store_true", help="also time the W4A16 and W8A8C8 rows at batch 1 "
                    "without CUDA graphs (each step's launches from the host), the public ops' replays on and off")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)

    from quantkit import api, runtime
    from quantkit.models.random import random_model
    from quantkit.recipe import PRESETS
    from quantkit.runtime import bench as rb
    from quantkit.runtime.calibrate import default_monitor_layers, monitor_histograms

    skip = set(filter(None, args.skip.split(",")))
    dev = args.device
    batches = [1, args.batch_big]
    over = {"num_hidden_layers": args.layers} if args.layers else {}
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "shape": args.shape, "layers": args.layers, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len}
    try:
        import transformers
        import triton

        meta.update(transformers=transformers.__version__, triton=triton.__version__)
    except Exception:
        pass
    _log("meta", json.dumps(meta))
    rows = []
    tuned = {}
    if args.tune and dev.startswith("cuda"):
        tuned["gemm"] = tune_decode_gemms(args.batch_big, dev)
        tuned["attention"] = tune_attention(args.att_batch, args.att_context, dev)
        _log("tuned", json.dumps(tuned))
    copy_bw = rb.measure_copy_bandwidth(dev)
    _log(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")

    def measure(rt, name, role, b):
        t0 = time.perf_counter()
        r = rb.bench_runtime(rt, name, batch=b, prompt_len=args.prompt_len, gen_len=args.gen_len).to_dict()
        r.update(role=role, wall_s=time.perf_counter() - t0)
        if b == 1 and role in ("quantized", "runtime-float"):
            ctx = args.prompt_len + args.gen_len / 2
            nbytes = rb.decode_bytes_per_token(rt, ctx)
            r.update(bytes_per_step=nbytes, roofline_ms=1e3 * nbytes / copy_bw)
        return r

    def record(r):
        rows.append(r)
        _log("row", json.dumps(r))

    def bench(rt, name, role, bs):
        for b in bs:
            record(measure(rt, name, role, b))

    def bench_ab(rt, name, role, bs):
        # the row as configured; with --chain-ab, per batch the runtime's PDL chain on, on with the plain config
        # entries (no CHAINED ones), off, and back (a b c c b a; graphs recaptured at each switch), each side's
        # two runs pooled: an order effect (clocks, the cache grown for a bigger batch, the allocator) weighs on
        # every side alike instead of on the side that runs later
        if not args.chain_ab:
            bench(rt, name, role, bs)
            return
        from quantkit.kernels import _common

        was = _common.CHAIN_PDL, _common.CHAINED_CONFIGS
        sides = {(True, True): (name, role), (True, False): (f"{name}, no CHAINED configs", f"{role}-plain-configs"),
                 (False, True): (f"{name}, no PDL chain", f"{role}-no-chain")}
        order = list(sides) + list(sides)[::-1]
        try:
            for b in bs:
                runs = {side: [] for side in sides}
                for side in order:
                    if side != (_common.CHAIN_PDL, _common.CHAINED_CONFIGS):
                        _common.CHAIN_PDL, _common.CHAINED_CONFIGS = side
                        rt.drop_graphs()
                    runs[side].append(measure(rt, *sides[side], b))
                for side in sides:
                    record(pool_runs(runs[side]))
        finally:
            _common.CHAIN_PDL, _common.CHAINED_CONFIGS = was
            rt.drop_graphs()

    def eager_replay_ab(rt, name, role):
        """--eager-replay-ab: batch 1 with CUDA graphs off, the linears' replays (``kernels._replay``) on and off
        (a b b a, each side's two runs pooled)."""
        if not args.eager_replay_ab:
            return
        from quantkit.kernels import _replay

        graphs, rt.use_graphs = rt.use_graphs, False
        prev = _replay.ON
        try:
            runs = {True: [], False: []}
            for on in (True, False, False, True):
                _replay.set_replay(on)
                runs[on].append(measure(rt, f"{name}, eager, replays {'on' if on else 'off'}",
                                        f"{role}-eager{'' if on else '-no-replay'}", 1))
            for on in (True, False):
                record(pool_runs(runs[on]))
        finally:
            _replay.set_replay(prev)
            rt.use_graphs = graphs
            rt.drop_graphs()

    if "bf16" not in skip:
        rt = runtime.from_float(random_model(args.shape, device=dev, **over), device=dev)
        bench_ab(rt, "BF16 runtime", "runtime-float", batches)
        del rt
        rb.free()
    if "hf" not in skip:
        model = random_model(args.shape, device=dev, **over)
        for b in batches:
            r = rb.bench_transformers(model, "transformers BF16", batch=b, prompt_len=args.prompt_len,
                                      gen_len=args.gen_len).to_dict()
            r.update(role="transformers")
            rows.append(r)
            _log("row", json.dumps(r))
        del model
        rb.free()
    if "w4" not in skip:
        rt = api.runtime_for_shape(args.shape, PRESETS["W4A16"], device=dev, layers=args.layers)
        if args.tune_chained and dev.startswith("cuda"):
            chosen = tune_chained(rt, lambda: measure(rt, "W4A16 g128 (tuning)", "tuning", 1)["ms_per_step"],
                                  write=args.write_configs)
            tuned["chained"] = {f"{n}x{k}": e["CHAINED"] for (_, n, k), e in chosen.items()}
            _log("tuned", json.dumps(tuned["chained"]))
        bench_ab(rt, "W4A16 g128", "quantized", batches)
        eager_replay_ab(rt, "W4A16 g128", "quantized")
        del rt
        rb.free()
    if "w8" not in skip:
        rt = api.runtime_for_shape(args.shape, PRESETS["W8A8C8"], device=dev, layers=args.layers)
        bench_ab(rt, "W8A8C8", "quantized", batches)
        eager_replay_ab(rt, "W8A8C8", "quantized")
        if "monitor" not in skip:
            layers = default_monitor_layers(rt)
            ids = torch.randint(0, rt.vocab, (8, 256), generator=torch.Generator().manual_seed(1))
            rt.enable_monitor(monitor_histograms(rt, ids, layers), layers)
            bench(rt, "W8A8C8 + fallback monitor", "monitor", [args.batch_big])
            rt.disable_monitor()
        del rt
        rb.free()
        if "mixed" not in skip:
            rt = api.runtime_for_shape(args.shape, PRESETS["W8A8C8"], device=dev, layers=args.layers,
                                       mixed_fraction=args.mixed_fraction)
            n_fp = len({n for n, m in rt.linears.items() if m.pinned})
            bench(rt, f"W8A8C8 mixed ({n_fp}/{len(rt.linears)} linears FP16)", "mixed", [args.batch_big])
            del rt
            rb.free()
    att = {}
    if "att" not in skip and dev.startswith("cuda"):
        att = _attention_bench(dev, args.att_batch, args.att_context)
        _log("attention", json.dumps(att))

    result = {"meta": meta, "copy_bw": copy_bw, "rows": rows, "attention": att, "tuned": tuned}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    md = markdown(result)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    print(md)


def pool_runs(runs: list[dict]) -> dict:
    """Repeated runs of one row as one (``bench_runtime``'s rows as dicts): decode time and steps summed (so its
    rate and ms/step are the pooled means), the mean prefill time, the largest peak memory; each run's ms/step
    kept in ``runs_ms_per_step`` (their spread is the noise). The rates come from ``BenchRow``, as every row's."""
    from dataclasses import fields

    from quantkit.runtime.bench import BenchRow

    row = BenchRow(**{f.name: runs[0][f.name] for f in fields(BenchRow)})
    row.prefill_s = sum(x["prefill_s"] for x in runs) / len(runs)
    row.decode_s = sum(x["decode_s"] for x in runs)
    row.decode_steps = sum(x["decode_steps"] for x in runs)
    peaks = [x["peak_gib"] for x in runs if x.get("peak_gib") is not None]
    row.peak_gib = max(peaks) if peaks else None
    return dict(runs[0], **row.to_dict(), wall_s=sum(x["wall_s"] for x in runs),
                runs_ms_per_step=[x["ms_per_step"] for x in runs])


def markdown(result) -> str:
    rows = result["rows"]

    def find(role, b, name=None):
        return next((r for r in rows if r["role"] == role and r["batch"] == b and (name is None or r["name"] == name)), None)

    out = ["| row | batch | prefill tok/s | decode tok/s | ms/step | x BF16 runtime | x transformers | peak GiB | "
           "weights GiB | KV MiB | fallback |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    def num(v, scale=1.0, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v / scale)

    for r in rows:
        base, hf = find("runtime-float", r["batch"]), find("transformers", r["batch"])
        ratio = (lambda b: f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}" if b else "")
        fb = "" if r.get("fallback_rate") is None else f"{r['fallback_rate']:.1%} ({r['switches']} switches)"
        out.append(f"| {r['name']} | {r['batch']} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} | "
                   f"{r['ms_per_step']:.2f} | {ratio(base)} | {ratio(hf)} | {num(r['peak_gib'], fmt='{:.1f}')} | "
                   f"{num(r['weight_bytes'], 2**30)} | {num(r['kv_bytes'], 2**20, '{:,.0f}')} | {fb} |")
    for r in rows:
        if "roofline_ms" in r:
            out.append(f"\nHBM roofline, {r['name']} batch 1: {r['bytes_per_step'] / 1e9:.3f} GB per step / "
                       f"{result['copy_bw'] / 1e12:.2f} TB/s = {r['roofline_ms']:.3f} ms; measured "
                       f"{r['ms_per_step']:.3f} ms = **{r['roofline_ms'] / r['ms_per_step']:.0%} of the roofline**")
    for r in rows:  # --chain-ab: the same row with the PDL chain on (as shipped), on with the plain configs, off
        for suffix, label, what in (("-no-chain", ", no PDL chain", "PDL chain"),
                                    ("-plain-configs", ", no CHAINED configs", "CHAINED configs")):
            if not r["role"].endswith(suffix):
                continue
            on = find(r["role"][:-len(suffix)], r["batch"], r["name"].replace(label, ""))
            if on:
                spread = "".join(f" ({side}: {', '.join(f'{v:.3f}' for v in x['runs_ms_per_step'])})"
                                 for side, x in (("on", on), ("off", r)) if "runs_ms_per_step" in x)
                out.append(f"\n{what}, {on['name']} batch {r['batch']}: {on['ms_per_step']:.3f} ms/step on, "
                           f"{r['ms_per_step']:.3f} off: **{r['ms_per_step'] / on['ms_per_step']:.3f}x** faster on"
                           f"; each side's two runs (in the order a b c c b a){spread}")
    for r in rows:  # --eager-replay-ab: batch 1 without CUDA graphs, replays on and off
        if r["role"].endswith("-eager-no-replay"):
            on = find(r["role"][:-len("-no-replay")], r["batch"], r["name"].replace("replays off", "replays on"))
            if on:
                spread = "".join(f" ({side}: {', '.join(f'{v:.3f}' for v in x['runs_ms_per_step'])})"
                                 for side, x in (("on", on), ("off", r)) if "runs_ms_per_step" in x)
                out.append(f"\nReplays, {on['name'].replace(', replays on', '')} batch {r['batch']}: "
                           f"{on['ms_per_step']:.3f} ms/step on, {r['ms_per_step']:.3f} off: "
                           f"**{r['ms_per_step'] / on['ms_per_step']:.3f}x** faster on; each side's two runs (a b b a)"
                           f"{spread}")
    att = result.get("attention") or {}
    if att:
        bf = att.get("bf16 (ours)", {}).get("us")
        sd = att.get("bf16 torch SDPA", {}).get("us")
        out.append("\n| decode attention | us | x ours BF16 | x SDPA BF16 | KV MiB |\n|---|---|---|---|---|")
        for n, v in att.items():
            out.append(f"| {n} | {v['us']:.1f} | {bf / v['us']:.2f} | {sd / v['us']:.2f} | {v['kv_bytes'] / 2**20:,.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()

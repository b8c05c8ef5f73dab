"""benchmarks/gemm.py, the script every kernel number in BENCHMARKS.md comes from, runs end to end on the CPU
(``--smoke``: the Triton interpreter, a tiny shape): a broken search costs device time that cannot be bought back."""

import os
import subprocess
import sys

import pytest

from tiny_models import benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gemm():
    return benchmark_script("gemm")


def test_tune_ranked_by_graph_replay_runs_and_checks_every_candidate(tmp_path):
    """``--tune --tune-rank graph`` on W8A8 at M = 16: every candidate checked against the reference, the search
    ranked by replay over weight copies, the winner re-timed eagerly for the table, the tuned config written."""
    out = tmp_path / "tuned.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gemm.py"), "--smoke", "--tune",
                        "--tune-spec", "w8a8:16", "--ms", "16", "--shapes", "64x256", "--tune-rank", "graph",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "w8a8 M=16 N=64 K=256 ranked by graph replay: " in p.stdout
    assert "Correctness: all checks passed" in p.stdout
    tuned = out.read_text()
    assert "|16|64|256" in tuned and "BLOCK_N" in tuned


def test_a_winner_without_a_mixed_mode_gets_the_faster_mixed_config():
    """Where the W8A8 winner has no mixed mode (warp-specialized), the tuner writes the entry that ran mixed calls
    (no FP16 row) fastest: the winner with MIXED_PASS, or with the fastest config that has a mixed mode as its MIXED
    config; or leaves the winner (its fallback) where neither beat it."""
    gemm = _gemm()

    ws = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4, BACKEND="gluon", WARP_SPECIALIZE=True)
    tma = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3, BACKEND="tma")
    two = dict(ws, MIXED_PASS=True)
    assert gemm.mixed_override(ws, tma, [(ws, 1834.0), (tma, 1712.0)]) == dict(ws, MIXED=tma)
    walk = dict(ws, MIXED_PASS="walk")  # the second pass walking the tiles one program an SM
    assert gemm.mixed_override(ws, tma, [(ws, 1834.0), (two, 1530.0), (walk, 1470.0)]) == walk
    assert gemm.mixed_override(ws, tma, [(ws, 1834.0), (two, 1470.0), (walk, 1530.0)]) == two
    assert gemm.mixed_override(ws, tma, [(ws, 1834.0), (tma, 1712.0), (two, 1530.0)]) == two
    assert gemm.mixed_override(ws, tma, [(ws, 265.0), (tma, 266.4), (two, 265.0)]) is None  # a tie keeps the winner
    assert gemm.mixed_override(ws, tma, [(ws, 265.0)]) is None  # the others failed their checks
    assert gemm.mixed_override(ws, tma, [(tma, 300.0)]) == dict(ws, MIXED=tma)

def test_skip_keys_leave_out_the_configs_of_a_failed_form(monkeypatch):
    """GEMM_SKIP_KEYS names config keys (a form whose GPU check failed); "A+B" names the configs with both."""
    gemm = _gemm()

    monkeypatch.setattr(gemm, "SKIP_KEYS", ["RS+WARP_SPECIALIZE", "PACKED_X"])
    assert gemm.skipped(dict(RS=True, WARP_SPECIALIZE=True)) and gemm.skipped(dict(PACKED_X=True))
    assert not gemm.skipped(dict(WARP_SPECIALIZE=True)) and not gemm.skipped(dict(RS=True))
    monkeypatch.setattr(gemm, "SKIP_KEYS", [])
    assert not gemm.skipped(dict(RS=True, WARP_SPECIALIZE=True))
    monkeypatch.setattr(gemm, "ONLY_KEYS", ["RS"])  # GEMM_ONLY_KEYS: only the configs of these forms
    assert not gemm.skipped(dict(RS=True, WARP_SPECIALIZE=True)) and gemm.skipped(dict(BACKEND="gluon"))
    # ...but the config calls run now is timed too: a one-form search must beat it to replace it
    assert not gemm.skipped(dict(BACKEND="gluon"), shipped=True)
    monkeypatch.setattr(gemm, "SKIP_KEYS", ["PACKED_X"])
    assert gemm.skipped(dict(PACKED_X=True), shipped=True)  # a failed form is left out even where shipped


def test_decode_parts_times_the_packing_and_each_call_checked():
    """``--decode-parts``: W4A16 M = 1 taken apart (the packing launch alone, the TMA-fed GEMV alone where it runs,
    the whole call with and without PDL, with PDL_CHAIN back to back, behind a torch op and behind the runtime's
    norm) for the shipped config and each TMA-fed tile, every call checked against the reference before it is timed;
    on the CPU the GEMV alone cannot run (no sm_90) and reads nan."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gemm.py"), "--smoke", "--decode-parts",
                        "--shapes", "512x256"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = [r for r in p.stdout.splitlines() if r.startswith("| 512 | 256 |") and "{" not in r and r.count("|") > 6]
    gemm = _gemm()

    assert len(rows) == 1 + len(gemm.DECODE_PART_TILES)  # the shipped config (no TMA tile here) and each tile
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        pack, one = cells[4].split()
        assert float(pack) > 0 and float(one.strip("()")) > 0
        assert cells[5] == "nan" and float(cells[6].split()[0]) > 0 and float(cells[7]) > 0
        # PDL_CHAIN back to back, and each call behind a torch op and behind the runtime's add + RMSNorm (PDL /
        # PDL_CHAIN): the TMA-fed tiles only here (the in-place half2 GEMV too, which the interpreter's configs
        # do not pick)
        tma = cells[2].startswith("TMA")
        assert (float(cells[8].split()[0]) > 0) if tma else cells[8].startswith("nan"), cells
        for c in cells[9:11]:
            assert (all(float(v) > 0 for v in c.split(" / "))) if tma else c == "nan", cells
    # W8A8 M = 1: the shipped GEMV and its PDL_CHAIN twin, back to back and behind a torch op, each checked
    w8 = [r for r in p.stdout.splitlines() if r.startswith("| 512 | 256 |") and "{" not in r and r.count("|") == 6]
    assert len(w8) == 1 and all(float(v) > 0 for v in w8[0].strip("|").replace("/", "|").split("|")[2:]), w8
    assert "failures: 0" in p.stdout
    assert "CHAINED N=512 K=256: " in p.stdout  # the shape's CHAINED choice, said (written with --write-configs)
    assert gemm.w4_decode_bytes(4096, 14336) == 4096 * 14336 // 2 + 4096 * 112 * 2 + 2 * 14336 + 2 * 4096


def test_decode_fit_times_each_kernel_and_fits_its_line():
    """``--decode-fit``: W4A16 M = 1 at several sizes for tinygemm (a blank column where it cannot run: the CPU),
    each point's shipped config and the fixed configs, every call checked first; then each kernel's line
    t = t0 + bytes / BW. The line fit itself is checked on exact points."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gemm.py"), "--smoke", "--decode-fit",
                        "--shapes", "256x128,256x256"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    gemm = _gemm()

    points = [r for r in p.stdout.splitlines() if r.startswith("| 256 | ") and "{" not in r]
    assert len(points) == 2 * 2  # each point logged as measured, then in the table
    for r in points:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[4] == ""  # tinygemm: no CPU kernel
        assert all(float(c) > 0 for c in cells[5:]) and len(cells) == 5 + 1 + len(gemm.DECODE_FIT_CONFIGS)
    fits = [r for r in p.stdout.splitlines() if r.startswith("| shipped |") or r.startswith("| TMA (")]
    assert len(fits) == 1 + 3 and "failures: 0" in p.stdout
    # 3 us and 2 TB/s (0.5e-6 us a byte): the table's BW column is 1e-6 / slope
    a, b, r = gemm.line_fit([10e6, 20e6, 40e6], [3.0 + 5.0, 3.0 + 10.0, 3.0 + 20.0])
    assert abs(a - 3.0) < 1e-9 and abs(1e-6 / b - 2.0) < 1e-9 and r < 1e-9
    a, b, r = gemm.line_fit([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert abs(b - 0.5) < 1e-12 and abs(a - 1.0) < 1e-12 and abs(r - 1.0) < 1e-12  # (2, 3) is 1 off


def test_decode_timeline_summary_reads_the_stamps():
    """``--decode-timeline``: off sm_90 it says so and times nothing; ``timeline_summary`` turns a replay's stamps
    (two launches of two programs, one an empty K split) into the spans, gaps and in-program times."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gemm.py"), "--smoke", "--decode-timeline"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0 and "needs an sm_90 GPU with Gluon; nothing timed" in p.stdout, p.stdout + p.stderr
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch

    import gemm
    from quantkit.kernels import wna16_gluon

    F = {n: i for i, n in enumerate(wna16_gluon.TIMELINE_FIELDS)}

    def prog(start_ns, end_ns, load_start, first, loop_end, clk0=1000):
        row = [0] * len(F)  # clock64 at 2 cycles a ns from clk0 at start_ns
        row[F["start_ns"]], row[F["end_ns"]] = start_ns, end_ns
        row[F["start"]], row[F["end"]] = clk0, clk0 + 2 * (end_ns - start_ns)
        row[F["load_start"]], row[F["first"]], row[F["loop_end"]] = load_start, first, loop_end
        return row

    tl = torch.tensor([[prog(0, 5000, 900, 3000, 9000), prog(400, 4000, 1300, 0, 0, clk0=1400)],
                       [prog(7000, 12000, 900, 3000, 9000), prog(7200, 11000, 1300, 0, 0, clk0=1400)]])
    s = gemm.timeline_summary(tl)
    want = dict(ghz=2.0, per_launch=7.0, span=5.0, gap=2.0,  # the gap: 7000 - 5000 ns
                start_spread=(0.4 + 0.2) / 2,  # the median of the two launches' spreads
                end_tail=(0.5 + 0.5) / 2,  # last end - median end
                # in-program times from the live programs only (the empty split has no first slot): 2 cycles a ns
                load_to_first=(3000 - 900) / 2 / 1e3, mul_to_first=(3000 - 1000) / 2 / 1e3,
                loop=(9000 - 3000) / 2 / 1e3, epilogue=(1000 + 10000 - 9000) / 2 / 1e3)
    assert s == pytest.approx(want, rel=1e-12)


def test_decode_parts_chained_choice():
    """``--decode-parts`` decides an M = 1 entry's CHAINED config behind the runtime's norm: the fastest config there
    where it beats the plain entry by more than 3%, else none (None, which drops a stale one); nothing where the
    plain entry was not timed there. A shipped CHAINED is never compared as if it were the plain entry."""
    gemm = _gemm()
    plain = dict(BACKEND="gemv_h2", BLOCK_N=64, SPLIT_K=4, UNROLL=8, num_warps=4, num_stages=1)
    twin = dict(plain, PDL=True, PREFETCH=2)
    shipped = dict(plain, CHAINED=dict(plain, BLOCK_N=32))
    entry, _ = gemm.sub_choice("CHAINED", shipped, [(9.6, shipped), (8.4, dict(shipped, PDL=True)),
                                                    (8.0, dict(twin, CHAINED=shipped["CHAINED"]))])
    assert entry == dict(plain, CHAINED=twin)
    entry, _ = gemm.sub_choice("CHAINED", shipped,
                               [(9.6, shipped), (9.4, twin), (float("nan"), dict(plain, BLOCK_N=16))])
    assert entry == dict(plain, CHAINED=None)  # 2% faster: inside the margin
    assert gemm.sub_choice("CHAINED", shipped, [(7.0, twin)])[0] is None


def test_bench_rounds_interleaves_reverses_and_drops_a_failing_call():
    """The peer tables and the mixed study time their kernels in rounds, the order reversed each round, each call's
    median; a call whose timing raises drops out (reported) where ``errors`` is given, else the error propagates."""
    gemm = _gemm()
    seen = []

    def timer(fn, rep):
        seen.append(fn())
        return {"a": [3.0, 1.0, 2.0, 9.0], "b": [5.0, 5.0, 4.0, 6.0], "c": [7.0]}[seen[-1]][
            sum(s == seen[-1] for s in seen) - 1]

    fns = {"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}
    assert gemm.bench_rounds({"a": fns["a"], "b": fns["b"]}, timer, rounds=4, rep=1) == {"a": 2.5, "b": 5.0}
    assert seen == ["a", "b", "b", "a", "a", "b", "b", "a"]

    def flaky(fn, rep):
        if fn() == "b":
            raise RuntimeError("capture failed")
        return 1.0

    errors: dict = {}
    assert gemm.bench_rounds(fns, flaky, rounds=3, errors=errors, rep=1) == {"a": 1.0, "c": 1.0}
    assert list(errors) == ["b"] and "capture failed" in str(errors["b"])
    with pytest.raises(RuntimeError):
        gemm.bench_rounds(fns, flaky, rounds=1, rep=1)
    assert gemm.bench_paired(fns["a"], fns["c"], timer=lambda fn, rep: {"a": 2.0, "c": 4.0}[fn()], rep=1) == (2.0, 4.0)


def test_peer_report_adds_the_host_time_table(monkeypatch):
    """The peers table reports each kernel's host time a call at M <= HOST_MAX_M beside the eager and graph
    tables: the number that says whether an eager time waited on the host."""
    gemm = _gemm()
    n = []
    assert gemm.host_time(lambda: n.append(1), calls=7) >= 0 and len(n) == 8  # one call before the timed ones

    monkeypatch.setattr(gemm.torch.cuda, "get_device_name", lambda *a: "FAKE GPU")
    rows = [dict(N=64, K=128, M=m, **{"w4|quantkit|eager": 5.0, "w4|quantkit|graph": 3.0, "w4|tinygemm|eager": 6.0,
                                       "w4|quantkit|host": 41.5 + m, "w4|tinygemm|host": 12.31,
                                       "w8a8|quantkit|host": 50.0})
            for m in (1, gemm.HOST_MAX_M * 2)]
    md = gemm.peer_report(rows, 3e12, [], None)
    host = md[md.index("Host us a call"):]
    assert "| w4 | 64 | 128 | 1 |  | 42.5 | 12.3 |  |" in host
    assert "| w8a8 | 64 | 128 | 1 |  | 50.0 |  |  |" in host
    assert f"| {gemm.HOST_MAX_M * 2} |" not in host  # beyond HOST_MAX_M: no host row
    assert "| 64 | 128 | 1 |  | 5.0 | 6.0 |  | tinygemm | 1.20 |" in md  # the eager table as before


def test_host_profile_names_where_the_host_time_goes():
    """``--host-profile``: the functions of a call that take the most host time of their own, per call."""
    gemm = _gemm()

    def slow_part():  # the time in its own Python loop (a builtin's time would be the builtin's)
        t = 0
        for i in range(2000):
            t += i
        return t

    def call():
        return slow_part() + len(str(3))

    text = gemm.host_profile(call, calls=50, top=3)
    lines = text.splitlines()
    assert lines[0].startswith("  total ") and len(lines) == 4
    assert "slow_part (test_benchmark_gemm_smoke.py:" in lines[1]  # the heaviest function of its own first
    assert " 1.0 calls: " in lines[1]


@pytest.mark.parametrize("which", ["memo", "lean launch", "replay"])
def test_switch_ab_times_the_call_with_the_switch_on_and_off(monkeypatch, which):
    """``--host-profile``'s A/Bs (the TMA memo, the lean launch, replays): each side runs the call with the switch set as its
    name says, and puts it back."""
    gemm = _gemm()
    from quantkit.kernels import _common, _gluon

    from quantkit.kernels import _replay

    mod, flag, ab = {"memo": (_gluon, "TMA_MEMO", gemm.tma_memo_ab),
                     "lean launch": (_common, "LEAN_LAUNCH", gemm.lean_launch_ab),
                     "replay": (_replay, "ON", gemm.replay_ab)}[which]
    seen = []
    monkeypatch.setattr(gemm, "bench", lambda fn, **kw: (fn(), 2.0 if seen[-1] else 3.0)[1])
    prev = getattr(mod, flag)
    text = ab(lambda: seen.append(getattr(mod, flag)))
    assert set(seen) == {True, False} and getattr(mod, flag) is prev
    assert text.endswith(f"eager 2.00 / 3.00 us ({which} on / off)") and text.startswith("host ")
    if which != "replay":  # the other switches' A/Bs run with replays off (their switches start new kinds of call)
        replays = []
        ab(lambda: replays.append(_replay.ON))
        assert set(replays) == {False} and _replay.ON


def test_peer_report_shows_an_inexact_peer_marked_and_unranked(monkeypatch):
    """A peer whose output missed our tolerance (GemLite's W4 GEMV, sessions 48-53) is timed and shown with ``*``
    in the eager, graph and host tables, but the best peer and the ratio come from the peers that passed."""
    gemm = _gemm()
    monkeypatch.setattr(gemm.torch.cuda, "get_device_name", lambda *a: "FAKE GPU")
    row = dict(N=64, K=128, M=1, **{"w4|quantkit|eager": 5.0, "w4|tinygemm|eager": 6.0, "w4|GemLite|eager": 4.0,
                                     "w4|quantkit|graph": 3.0, "w4|tinygemm|graph": 3.3, "w4|GemLite|graph": 2.0,
                                     "w4|GemLite|inexact": True, "w4|GemLite|host": 99.04})
    md = gemm.peer_report([row], 3e12, [], None)
    assert "| 64 | 128 | 1 |  | 5.0 | 6.0 | 4.0* | tinygemm | 1.20 |" in md
    assert "| 64 | 128 | 1 |  | 3.0 | 3.3 | 2.0* | tinygemm | 1.10 |" in md
    assert "| w4 | 64 | 128 | 1 |  |  |  | 99.0* |" in md
    assert "`*` = a peer whose output missed our relative-error tolerance" in md
    # the same row with GemLite exact: it is the best peer
    del row["w4|GemLite|inexact"]
    assert "| 64 | 128 | 1 |  | 5.0 | 6.0 | 4.0 | GemLite | 0.80 |" in gemm.peer_report([row], 3e12, [], None)


def test_tune_eager_gives_a_two_launch_entry_its_one_launch_form(tmp_path):
    """``--peers --tune-eager``: a W8A8 M = 16 entry whose plain config takes two launches (the interpreter's) gets
    the one-launch candidates checked and timed by eager calls, the fastest re-timed against it, and its EAGER
    choice said and kept; the table then times the entry as calls run it."""
    out = tmp_path / "eager.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gemm.py"), "--smoke", "--peers",
                        "--tune-eager", "--tune-decode-kinds", "w8a8", "--ms", "16", "--shapes", "64x256",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert "EAGER w8a8 N=64 K=256 M=16: " in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert "w8a8 N=64 K=256 M=16 eager rounds: " in p.stdout
    import json

    tuned = json.loads(out.read_text())["tuned"]
    (key, entry), = [(k, v) for k, v in tuned.items() if k.startswith("w8a8|")]
    assert key.endswith("|16|64|256") and "EAGER" in entry  # (None: no one-launch form won in the interpreter)
    assert entry["EAGER"] is None or _gemm().launches("w8a8", entry["EAGER"]) == 1


def test_eager_search_candidates_take_one_launch_and_the_choice_needs_a_margin():
    """The EAGER candidates are one-launch forms; ``sub_choice`` keeps the fastest only where it beats the plain
    entry by the margin (5% for EAGER) and never compares a shipped sub-config as if it were the plain entry."""
    gemm = _gemm()
    assert gemm.launches("w4a16", dict(BACKEND="gemv_h2", PACKED_X=True)) == 2
    assert gemm.launches("w4a16", dict(BACKEND="gemv_h2", TMA_RING=6)) == 2
    assert gemm.launches("w4a16", dict(BACKEND="gemv_h2")) == 1
    assert gemm.launches("w8a8", dict(BACKEND="gemv", FUSE_QUANT=False)) == 2
    assert gemm.launches("w8a8", dict(BLOCK_M=16, QUANT_ONCE=True)) == 1
    for kind, M in (("w4a16", 1), ("w8a8", 1), ("w8a8", 16)):
        cands = gemm.eager_candidates(kind, M)
        assert len(cands) >= 10 and all(gemm.launches(kind, c) == 1 for c in cands), kind
    plain = dict(BACKEND="gemv", BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=2, FUSE_QUANT=False, PDL=True)
    fused = dict(plain, FUSE_QUANT=True, PDL=False)
    shipped = dict(plain, EAGER=dict(fused, BLOCK_N=8))
    entry, _ = gemm.sub_choice("EAGER", shipped, [(24.7, plain), (11.0, fused), (12.0, shipped["EAGER"])], 0.05)
    assert entry == dict(plain, EAGER=fused)
    entry, _ = gemm.sub_choice("EAGER", shipped, [(24.7, plain), (23.9, fused)], 0.05)
    assert entry == dict(plain, EAGER=None)  # 3% faster: inside the margin
    assert gemm.sub_choice("EAGER", shipped, [(11.0, fused)], 0.05)[0] is None


def test_eager_cost_is_the_longer_of_eager_and_host_time(monkeypatch):
    """An EAGER search ranks by what a call outside a graph costs back to back: its host time where that is longer
    than do_bench's eager time (which an L2 flush can partly hide), else the eager time."""
    gemm = _gemm()
    monkeypatch.setattr(gemm, "bench", lambda fn, **kw: 25.7)
    monkeypatch.setattr(gemm, "host_time", lambda fn, calls=100: 79.5)
    assert gemm.eager_cost(lambda: None) == 79.5
    monkeypatch.setattr(gemm, "host_time", lambda fn, calls=100: 13.0)
    assert gemm.eager_cost(lambda: None) == 25.7


def test_mixed_study_times_the_replayed_pair(monkeypatch):
    """``--mixed-study``'s replayed pair: plain W8A8 and mixed each through a replay of its own call, warmed up (run,
    recorded, replayed), then timed interleaved."""
    import types

    import torch

    gemm = _gemm()
    ran = []
    monkeypatch.setattr(gemm, "run_w8a8", lambda L, x, cfg, out=None: ran.append(("w8a8", cfg)) or out)
    monkeypatch.setattr(gemm, "run_mixed", lambda L, x, cfg, rb, ctrl, with_fp16=True, out=None: (
        ran.append(("mixed", cfg)) or out))
    monkeypatch.setattr(gemm, "bench_paired", lambda fa, fb, **kw: (fa(), fb(), 1.0, 2.0)[2:])
    L = types.SimpleNamespace(w8=types.SimpleNamespace(w=torch.zeros(4, 8), scale=torch.ones(4)),
                              w16=torch.zeros(4, 8))
    x, out, rb = torch.zeros(2, 8), torch.zeros(2, 4), torch.zeros(2, dtype=torch.uint8)
    assert gemm.replayed_pair(L, x, "plain", "mixed", rb, out) == (1.0, 2.0)
    assert ran == [("w8a8", "plain"), ("mixed", "mixed")] * 4


def test_replayed_run_times_each_config_through_its_own_replay(monkeypatch):
    """The EAGER search's calls go through replays (as the shipped entry in the table): one site per config, the
    default output where the search passes none."""
    import torch

    gemm = _gemm()
    seen = []
    monkeypatch.setattr(gemm._replay, "call", lambda site, x, out, fn: seen.append((site, out)) or fn())
    ran = []
    x, default = torch.zeros(1, 8), torch.zeros(1, 4)
    call = gemm.replayed_run(lambda cfg, o: ran.append((cfg["A"], o)) or o, x, default, (torch.zeros(4, 8),))
    other = torch.zeros(1, 4)
    assert call({"A": 1}, None) is default and call({"A": 2}, other) is other and call({"A": 1}, None) is default
    assert [a for a, _ in ran] == [1, 2, 1] and ran[1][1] is other
    assert seen[0][0] is seen[2][0] and seen[0][0] is not seen[1][0]  # a site per config, kept

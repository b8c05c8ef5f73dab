"""benchmarks/runtime.py's logic on the CPU: the chain A/B's interleaved sides and the CHAINED choice by the
runtime's own step time (their GPU numbers are in BENCHMARKS.md)."""

import os
import subprocess
import sys

from tiny_models import benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runtime_bench():
    return benchmark_script("runtime")


IN_PLACE = dict(BACKEND="gemv_h2", BLOCK_N=64, SPLIT_K=4, UNROLL=8, num_warps=4, num_stages=1, SLICE_PRESCALE=True)
TMA = dict(BACKEND="gemv_h2", BLOCK_N=128, SPLIT_K=8, UNROLL=1, num_warps=4, num_stages=1, PACKED_X=True, PDL=True,
           PER_BLOCK=True, TMA_RING=6)


def test_chained_candidates_are_the_in_place_gemvs_pdl_twins():
    rb = _runtime_bench()
    assert rb.chained_candidates(IN_PLACE) == [None, dict(IN_PLACE, PDL=True), dict(IN_PLACE, PDL=True, PREFETCH=2)]
    for plain in (TMA, dict(IN_PLACE, PDL=True), dict(BACKEND="mma", BLOCK_M=16, BLOCK_N=64)):
        assert rb.chained_candidates(plain) == [None]


def test_choose_chained_keeps_a_twin_only_where_the_step_gets_faster():
    """Each shape's candidates timed in the order a b c, c b a with the shapes before it as chosen; a twin is kept
    only where it beats none by more than the margin (0.3% of the step); a shape with no twin is not timed."""
    rb = _runtime_bench()
    cost = {(4096, 4096): {None: 0.10, "PDL": 0.06, "PREFETCH": 0.01},  # ms each choice adds to a 1.5 ms step
            (6144, 4096): {None: 0.05, "PDL": 0.049, "PREFETCH": 0.06}}
    state, order = {}, []

    def key(c):
        return None if c is None else ("PREFETCH" if c.get("PREFETCH") else "PDL")

    def install(N, K, chained):
        state[(N, K)] = key(chained)

    def time_step():
        order.append(dict(state))
        return 1.5 + sum(c[state.get(s)] for s, c in cost.items())

    entries = {(4096, 4096): IN_PLACE, (4096, 14336): TMA, (6144, 4096): dict(IN_PLACE, PER_BLOCK=True)}
    chosen = rb.choose_chained(entries, install, time_step, rounds=2)
    assert key(chosen[(4096, 4096)][0]) == "PREFETCH"
    assert chosen[(4096, 14336)] == (None, {0: []})  # nothing to try: not timed
    assert chosen[(6144, 4096)][0] is None  # 0.001 ms faster with PDL: inside the margin
    assert state == {(4096, 4096): "PREFETCH", (4096, 14336): None, (6144, 4096): None}
    assert len(order) == 12  # two shapes with three candidates, two rounds each
    assert [o[(4096, 4096)] for o in order[:6]] == [None, "PDL", "PREFETCH", "PREFETCH", "PDL", None]
    assert all(o[(4096, 4096)] == "PREFETCH" for o in order[6:])  # the later shape timed on the earlier's choice


def test_chain_ab_times_three_sides_interleaved():
    """``--chain-ab`` on the CPU (tiny shape, torch references): per batch the chain on, on with the plain
    entries, off, each side's two runs pooled and both kept."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # torch references, not the interpreter
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "runtime.py"), "--device", "cpu", "--shape",
                        "tiny", "--prompt-len", "16", "--gen-len", "4", "--batch-big", "2", "--skip",
                        "hf,monitor,mixed,att,w8,bf16", "--chain-ab"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for b in (1, 2):
        for what in ("PDL chain", "CHAINED configs"):
            line = next(ln for ln in p.stdout.splitlines() if ln.startswith(f"{what}, W4A16 g128 batch {b}:"))
            on, off = (part.split(")")[0].split(", ") for part in line.split("(on: ")[1].split("(off: "))
            assert len(on) == 2 and len(off) == 2 and all(float(v) > 0 for v in on + off), line


def test_tune_chained_finds_the_steps_entries_and_leaves_its_choice_in_place(monkeypatch):
    """``tune_chained``'s glue: the W4A16 M = 1 entries one decode step asks for (not the prefill's), each choice
    installed in the in-process table (plans and graphs dropped), the winner left there and returned for
    ``write_tuned``, and the table's own ``get`` back afterwards."""
    import torch

    from quantkit.kernels import wna16

    rb = _runtime_bench()
    for key, cfg in ((("cpu", 1, 4096, 4096), IN_PLACE), (("cpu", 1, 4096, 14336), TMA)):
        monkeypatch.setitem(wna16.CONFIGS.table, key, dict(cfg))

    class FakeRuntime:  # asks for what a decode step of Llama-3-8B-shaped o_proj / down_proj would
        device, use_graphs, drops = torch.device("cpu"), True, 0

        def generate(self, prompts, max_new_tokens, sync_every_step):
            assert self.use_graphs is False  # eager, so every GEMM plans
            for M in (3, 1):
                wna16.CONFIGS.get(M, 4096, 4096, "cpu")
                wna16.CONFIGS.get(M, 4096, 14336, "cpu")
            wna16.CONFIGS.get(3, 6144, 4096, "cpu")  # prefill only: not tuned

        def drop_graphs(self):
            self.drops += 1

    rt = FakeRuntime()

    def time_step():
        chained = wna16.CONFIGS.get(1, 4096, 4096, "cpu").get("CHAINED") or {}
        return 1.7 - 0.05 * chained.get("PDL", 0) - 0.04 * (chained.get("PREFETCH", 0) == 2)

    out = rb.tune_chained(rt, time_step)
    assert out == {(1, 4096, 4096): dict(IN_PLACE, CHAINED=dict(IN_PLACE, PDL=True, PREFETCH=2)),
                   (1, 4096, 14336): dict(TMA, CHAINED=None)}
    assert wna16.CONFIGS.table[("cpu", 1, 4096, 4096)]["CHAINED"] == dict(IN_PLACE, PDL=True, PREFETCH=2)
    assert rt.use_graphs is True and rt.drops >= 6 and "get" not in vars(wna16.CONFIGS)


def test_eager_replay_ab_times_both_sides_interleaved():
    """``--eager-replay-ab`` on the CPU (tiny shape, torch references: nothing replays there, so the two sides are
    the same calls): batch 1 without graphs, replays on and off, each side's two runs pooled, the line printed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "runtime.py"), "--device", "cpu", "--shape",
                        "tiny", "--prompt-len", "16", "--gen-len", "4", "--batch-big", "2", "--skip",
                        "hf,monitor,mixed,att,bf16", "--eager-replay-ab"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for name in ("W4A16 g128", "W8A8C8"):
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith(f"Replays, {name}, eager batch 1:"))
        on, off = (part.split(")")[0].split(", ") for part in line.split("(on: ")[1].split("(off: "))
        assert len(on) == 2 and len(off) == 2 and all(float(v) > 0 for v in on + off), line

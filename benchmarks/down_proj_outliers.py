"""Per-token outliers of the down_proj inputs (the SwiGLU output) of the default model, before and after a
Hadamard transform: why per-token INT8 loses there and what the online R4 does (BENCHMARKS.md, issue 23, W8A8).

    python benchmarks/down_proj_outliers.py [--samples 4] [--seqlen 512]

Per layer and token: max |x| over the token's RMS (a token's INT8 step is max / 127, so a typical channel keeps
about 127 / ratio levels; sqrt(width) is the largest possible ratio: all of the token's energy in one channel).
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()

    import torch

    from quantkit import api
    from quantkit.calib.data import calibration_set
    from quantkit.kernels.hadamard import hadamard_transform
    from quantkit.models.hooks import online_rotation_spec

    loaded = api.load(args.model, dtype="float32", device="cpu")
    model = loaded.model
    ids = calibration_set(loaded.tokenizer, None, samples=args.samples, seqlen=args.seqlen, seed=0).input_ids
    r4_inputs = [model.get_submodule(n) for n in online_rotation_spec(model, r3=False, r4=True)["r4"]["modules"]]

    def ratios(rotate: bool) -> list[tuple[float, float, float, float]]:
        """Per layer: (median, max) over tokens of max|x| / rms, the largest |x|, the median token RMS."""
        out = []

        def pre(_m, a):
            x = a[0].detach().float()
            x = (hadamard_transform(x) if rotate else x).reshape(-1, x.shape[-1]).abs()
            mx, rms = x.amax(dim=1), x.pow(2).mean(dim=1).sqrt()
            r = mx / rms
            out.append((float(r.median()), float(r.max()), float(mx.max()), float(rms.median())))

        hs = [m.register_forward_pre_hook(pre) for m in r4_inputs]
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for h in hs:
                h.remove()
        return out

    plain, rotated = ratios(False), ratios(True)
    print("| layer | median token max/rms | largest max/rms | largest abs | median token rms "
          "| after Hadamard: median / largest max/rms |")
    print("|---|---|---|---|---|---|")
    for i, (p, r) in enumerate(zip(plain, rotated)):
        print(f"| {i} | {p[0]:.1f} | {p[1]:.1f} | {p[2]:.1f} | {p[3]:.3f} | {r[0]:.1f} / {r[1]:.1f} |")
    print(f"\nbefore: median over layers of the median token's ratio {statistics.median(p[0] for p in plain):.1f}, "
          f"largest {max(p[1] for p in plain):.1f}; after Hadamard: worst layer's median token "
          f"{max(r[0] for r in rotated):.1f}, largest {max(r[1] for r in rotated):.1f}")


if __name__ == "__main__":
    main()

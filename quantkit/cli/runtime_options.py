"""Options shared by the commands that run the runtime (generate, bench, eval --runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

FallbackOpt = Annotated[
    bool,
    typer.Option("--fallback/--no-fallback",
                 help="Online fallback monitor: a request whose activations drift from calibration moves to FP16."),
]
FallbackLayersOpt = Annotated[
    Optional[str],
    typer.Option("--fallback-layers", help="Comma-separated linears to monitor (default: 4 down_proj spread over depth)."),
]
KLOpt = Annotated[float, typer.Option("--kl-threshold", help="Monitor: KL(window || calibration) that triggers FP16.")]
SkewOpt = Annotated[float, typer.Option("--skew-threshold", help="Monitor: |skewness| that triggers FP16.")]
HistOpt = Annotated[
    Optional[Path],
    typer.Option("--hist", help="Calibration histograms from `quantkit scan` (.hist.safetensors); default: a short "
                 "calibration pass through the runtime."),
]
LatentCacheOpt = Annotated[
    bool,
    typer.Option("--latent-cache/--no-latent-cache",
                 help="DeepSeek-V2/V3: cache the compressed latent (kv_b absorbed into query and output) instead of "
                      "K and V per head; weight-only checkpoints with a float KV cache."),
]
RtDeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (GPU kernels on CUDA).")]
RtDtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPU, the checkpoint's dtype on CPU), float16, bfloat16, float32.")]


def fallback_layers(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


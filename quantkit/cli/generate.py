"""`quantkit generate DIR --prompt ...`: run a checkpoint on the runtime and stream its tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.runtime_options import (FallbackLayersOpt, FallbackOpt, HistOpt, KLOpt, LatentCacheOpt, RtDeviceOpt,
                                          RtDtypeOpt, SkewOpt, fallback_layers)
from quantkit.cli.ui import console, err_console, fail, handle_errors, status


def check_generation_options(max_new_tokens: int, temperature: float, top_p: float) -> None:
    from quantkit.errors import UsageError

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")


@handle_errors
def generate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint dir written by quantkit.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt text; repeat for a batch.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy; else sampling temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (same seed, same tokens).")] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the tokenizer's chat template.")] = False,
    fallback: FallbackOpt = True,
    fallback_layers_: FallbackLayersOpt = None,
    kl_threshold: KLOpt = 0.02,
    skew_threshold: SkewOpt = 3.0,
    hist: HistOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write tokens, timings and switches here.")] = None,
    device: RtDeviceOpt = "auto",
    dtype: RtDtypeOpt = "auto",
    latent_cache: LatentCacheOpt = False,
) -> None:
    """Generate from a checkpoint on quantkit's runtime; one prompt streams its tokens as they come.

    The runtime runs the Triton kernels on a GPU and their torch references on CPU."""
    from quantkit.validate import check_device, check_dtype, check_float, check_output_file

    check_generation_options(max_new_tokens, temperature, top_p)
    if not prompt:
        fail("give at least one --prompt")
    check_output_file("--json", json_out)
    check_device(device)
    check_dtype(dtype)
    check_float("--kl-threshold", kl_threshold, min=0, min_open=True)
    check_float("--skew-threshold", skew_threshold, min=0, min_open=True)
    from quantkit import runtime
    from quantkit.runtime.calibrate import attach_fallback

    status(f"loading {checkpoint} on the runtime ...")
    rt = runtime.load(checkpoint, device=device, dtype=dtype, latent_cache=latent_cache)
    tok = rt.tokenizer
    if fallback:
        mon = attach_fallback(rt, layers=fallback_layers(fallback_layers_), hist=hist, kl_threshold=kl_threshold,
                              skew_threshold=skew_threshold)
        if mon is None:
            status("fallback monitor: off (every linear already runs FP16 activations and has no FP16 copy)")
        else:
            status(f"fallback monitor: on, watching {len(mon.layers)} linears (KL > {kl_threshold}, |skew| > {skew_threshold})")
    texts = list(prompt)
    ids = _encode(tok, texts, chat, checkpoint)
    stream = len(ids) == 1
    shown: list[str] = [""]
    got: list[int] = []

    def on_token(b: int, t: int) -> None:
        got.append(t)
        text = tok.decode(got, skip_special_tokens=True)
        new = text[len(shown[0]):]
        if new:
            sys.stdout.write(new)
            sys.stdout.flush()
            shown[0] = text

    if stream:
        sys.stdout.write(texts[0] if not chat else "")
        sys.stdout.flush()
    res = rt.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      eos_token_id=tok.eos_token_id, on_token=on_token if stream else None)
    if stream:
        sys.stdout.write("\n")
    else:
        for t, out in zip(texts, res["tokens"]):
            console.print(f"[bold]{t}[/]" + tok.decode(out, skip_special_tokens=True), highlight=False)
    _print_timing(res, len(ids), rt.device, fallback)
    if json_out is not None:
        from quantkit.run import write_text_atomic

        write_text_atomic(json_out, json.dumps({"prompts": texts, **res}, indent=2) + "\n")


def _encode(tok, texts: list[str], chat: bool, checkpoint: Path) -> list[list[int]]:
    """Token ids of each prompt (wrapped in the tokenizer's chat template with --chat)."""
    if chat:
        if not getattr(tok, "chat_template", None):
            fail(f"{checkpoint}'s tokenizer has no chat template; drop --chat")
        ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
        ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    else:
        ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    if any(len(x) == 0 for x in ids):
        fail("a prompt tokenizes to nothing; give some text")
    return ids


def _print_timing(res: dict, n: int, device, fallback: bool) -> None:
    steps = max(res["decode_steps"], 1)
    err_console.print(
        f"prefill {res['prompt_tokens']} tokens in {res['prefill_s']:.2f} s; decode {res['decode_steps']} steps x "
        f"{n} in {res['decode_s']:.2f} s ({res['decode_s'] / steps * 1e3:.1f} ms/step) on {device}"
        + (f"; {len(res['fallback'])} fallback switch(es)" if fallback else ""), highlight=False)
    for s in res["fallback"]:
        err_console.print(f"  fallback: request {s['request']} -> FP16 at token {s['token']} ({s['layer']}: "
                          f"{s['statistic']} = {s['value']:.3g})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)

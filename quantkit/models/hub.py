"""Hugging Face hub access that fails in seconds, in one line, when the hub cannot be reached.

The hub client retries a dead network for about half a minute, printing a line per
retry. Here: the local cache answers first when `HF_HUB_OFFLINE` is set (and only
it); otherwise one TCP connection to the hub endpoint is tried (a few seconds at
most) before the client is called, and a model or dataset that is not cached gives
one ModelLoadError naming the fixes. With a proxy configured the probe is skipped
(the proxy, not this machine, reaches the hub).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

from quantkit.errors import UsageError, short

PROBE_SECONDS = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


class HubUnreachableError(UsageError):
    """The hub cannot be reached (or offline mode is on) and the cache lacks what was asked."""


def offline() -> bool:
    """HF_HUB_OFFLINE as the hub client reads it."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def unreachable_reason(url: str | None = None, timeout: float = PROBE_SECONDS) -> str | None:
    """Why the hub endpoint cannot be reached (None when a TCP connection opens, or a proxy is set)."""
    import socket

    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    parts = urlsplit(url or endpoint())
    host = parts.hostname
    if not host:
        return f"the hub endpoint {short(url or endpoint())!r} has no host"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e.strerror or str(e) or type(e).__name__)

    t = threading.Thread(target=attempt, daemon=True)  # bounds a slow name lookup too
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no answer from {host}:{port} within {timeout:.0f} s"
    return None if result[0] is None else f"{host}:{port}: {str(result[0]).lower()}"


def _not_cached(what: str, why: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"cannot fetch {what}: {why}, and it is not in the local hub cache; check the network, or pass a "
        "local directory or .gguf file"
    )


def snapshot(repo_id: str, patterns: list[str], what: str | None = None) -> Path:
    """Local path of a hub repo's files matching `patterns` (downloaded when needed)."""
    from huggingface_hub import snapshot_download

    what = what or f"{short(repo_id)!r} from the Hugging Face hub"
    return Path(_fetch(lambda local: snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local), what))


def file(repo_id: str, filename: str, what: str | None = None) -> Path:
    """Local path of one file of a hub repo (downloaded when needed)."""
    from huggingface_hub import hf_hub_download

    what = what or f"{filename} of {short(repo_id)!r} from the Hugging Face hub"
    return Path(_fetch(lambda local: hf_hub_download(repo_id, filename, local_files_only=local), what))


def _fetch(call, what: str):
    if offline():
        try:
            return call(True)
        except Exception as e:  # the client raises many types for "not in the cache"
            raise _not_cached(what, "HF_HUB_OFFLINE is set (unset it to download)") from e
    why = unreachable_reason()
    if why is not None:
        try:
            return call(True)  # the cache still serves what was fetched before
        except Exception as e:
            raise _not_cached(what, f"the hub at {short(endpoint())} is unreachable ({why})") from e
    try:
        return call(False)
    except Exception as e:  # the hub client raises many types; all mean "not there for us"
        kind = type(e).__name__
        hint = "check the id" if "NotFound" in kind or "Gated" in kind else "check the id and your network"
        raise UsageError(f"could not fetch {what} ({kind}); {hint}, or pass a local directory or .gguf file") from e


def check_dataset_reachable(spec: str) -> None:
    """HubUnreachableError, within seconds, for an `hf:` dataset when the hub cannot be reached.

    With HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) set, `datasets` reads its cache itself.
    """
    if offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return
    why = unreachable_reason()
    if why is not None:
        raise HubUnreachableError(
            f"cannot fetch dataset {short(spec)!r}: the hub at {short(endpoint())} is unreachable ({why}); "
            "set HF_HUB_OFFLINE=1 to use the datasets cache, or pass a .txt/.jsonl file or builtin"
        )

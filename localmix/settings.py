"""Every setting and environment variable, with its default; read when called, never at import."""

from __future__ import annotations

import os
from pathlib import Path

# name -> help; the CLI's `--help` epilog and the README list these.
ENVIRONMENT = {
    "LOCALMIX_HOME": "where models, manifests, temporary files and bench history live "
    "(default: the platform's user data directory)",
    "LOCALMIX_THREADS": "threads for generation (default: physical cores)",
    "LOCALMIX_CACHE": "where rebuildable files live: llama.cpp's RPC backend, a worker's tensor "
    "cache (default: the platform's user cache directory)",
    "LOCALMIX_DEBUG": "set to 1 to show tracebacks",
    "LOCALMIX_REPACK": "1 or 0: let llama.cpp repack weights for the CPU, or not (default: yes, "
    "except on builds with AMX kernels; `localmix doctor` says which)",
    "LOCALMIX_RPC": "llama.cpp RPC workers (`localmix worker`) for chat, bench, eval, serve and "
    "doctor when --rpc is not given: HOST:PORT,... (llama.cpp's own tools read LLAMA_ARG_RPC)",
    "LOCALMIX_API_KEY": "serve: the keys a request must carry, comma-separated "
    "(Authorization: Bearer KEY)",
    "LOCALMIX_ORIGINS": "serve: more web origins that may call it, comma-separated (* for any)",
    "LOCALMIX_HOSTS": "serve: more Host names it answers to, comma-separated (*.example.com)",
    "HF_HOME": "the shared Hugging Face cache, where downloads stay",
    "HF_TOKEN": "Hugging Face token for gated repositories",
    "HF_HUB_OFFLINE": "set to 1 to never touch the network",
    "HF_ENDPOINT": "the Hub's address (default https://huggingface.co)",
}


def home() -> Path:
    """The localmix home directory (not created here)."""
    value = os.environ.get("LOCALMIX_HOME")
    if value:
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            # every command would fail later with a confusing ENOTDIR deep inside the store
            from localmix.errors import UsageError

            raise UsageError(
                f"LOCALMIX_HOME={value} is a file, not a directory",
                hint="point LOCALMIX_HOME at a directory (or unset it for the default)",
            )
        return path
    import platformdirs

    return Path(platformdirs.user_data_dir("localmix", appauthor=False))


def cache_dir() -> Path:
    """Files localmix can make again (not created here): LOCALMIX_CACHE, else the platform's user
    cache directory."""
    value = os.environ.get("LOCALMIX_CACHE")
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("localmix", appauthor=False))


def rpc_tensor_cache_dir() -> Path:
    """Where `localmix worker` keeps the tensors clients sent it (llama.cpp's rpc-server -c)."""
    return cache_dir() / "rpc"


def models_dir() -> Path:
    return home() / "models"


def manifests_dir() -> Path:
    return home() / "manifests"


def tmp_dir() -> Path:
    return home() / "tmp"


def bench_history_path() -> Path:
    return home() / "bench" / "history.jsonl"


def chats_dir() -> Path:
    """Where the REPL's /save writes conversations (and /load finds the latest)."""
    return home() / "chats"


def repl_history_path() -> Path:
    """The REPL's input history (prompt-toolkit's file history)."""
    return home() / "history"


def paths() -> dict[str, Path]:
    """Every place localmix reads or writes, by what lives there (nothing is created)."""
    return {
        "home": home(),
        "models": models_dir(),
        "manifests": manifests_dir(),
        "tmp": tmp_dir(),
        "bench history": bench_history_path(),
        "chats": chats_dir(),
        "REPL history": repl_history_path(),
        "user catalog": user_catalog_path(),
        "synthetic checkpoints": synth_dir(),
        "cache": cache_dir(),
        "RPC tensor cache": rpc_tensor_cache_dir(),
        "Hugging Face cache": hf_cache_dir(),
    }


def user_catalog_path() -> Path:
    return home() / "models.toml"


def synth_dir() -> Path:
    """Where the demo and `localmix synth` keep synthetic checkpoints."""
    return home() / "synth"


def debug() -> bool:
    return os.environ.get("LOCALMIX_DEBUG", "") not in ("", "0", "false")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


# ggml's GGML_MAX_N_THREADS: more threads overflow its fixed arrays (std::bad_alloc, abort).
MAX_THREADS = 512


def max_threads() -> int:
    """The most threads localmix lets llama.cpp start: 4 per logical CPU, at most 512."""
    return min(MAX_THREADS, 4 * (os.cpu_count() or 1))


def check_threads(count: int, source: str = "--threads") -> int:
    """count, if this machine can run that many threads; else UsageError with the numbers."""
    from localmix.errors import UsageError

    limit = max_threads()
    if count < 1:
        raise UsageError(
            f"{source} must be at least 1, not {count}",
            hint="leave it out to use the physical cores",
        )
    if count > limit:
        raise UsageError(
            f"{source} {count} is more than {limit} "
            f"(4 per logical CPU on this machine's {os.cpu_count() or 1}, at most {MAX_THREADS})",
            hint="leave it out to use the physical cores",
        )
    return count


def default_threads() -> int:
    """Threads for generation: LOCALMIX_THREADS, else the physical core count (llama.cpp's rule)."""
    value = os.environ.get("LOCALMIX_THREADS", "").strip()
    if value:
        from localmix.errors import UsageError

        try:
            count = int(value)
        except ValueError:
            raise UsageError(
                f"LOCALMIX_THREADS={value[:20]!r} is not a whole number",
                hint="unset it to use the physical cores",
            ) from None
        return check_threads(count, "LOCALMIX_THREADS")
    count = os.cpu_count() or 1
    # Hyper-threads slow generation down; llama.cpp defaults to physical cores too.
    return max(1, count // 2) if count >= 8 else count


def repack() -> bool | None:
    """LOCALMIX_REPACK as a choice (1/0, true/false, yes/no, on/off); None when unset."""
    value = os.environ.get("LOCALMIX_REPACK", "").strip().lower()
    if not value:
        return None
    for choice, words in ((True, ("1", "true", "yes", "on")), (False, ("0", "false", "no", "off"))):
        if value in words:
            return choice
    from localmix.errors import UsageError

    raise UsageError(
        f"LOCALMIX_REPACK={value[:20]!r} is neither 1 nor 0",
        hint="set it to 1 (repack weights) or 0 (never), or unset it for localmix's rule",
    )


def rpc_workers() -> str | None:
    """LOCALMIX_RPC: the workers a command that loads a model uses when --rpc is not given
    (HOST:PORT,...); None when unset or blank."""
    value = os.environ.get("LOCALMIX_RPC", "").strip()
    return value or None


def hf_endpoint() -> str:
    """The Hub's address: HF_ENDPOINT, else https://huggingface.co (huggingface_hub's rule)."""
    value = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        from localmix.errors import UsageError

        shown = value.split("@")[-1] if "@" in value else value  # never echo a userinfo token
        raise UsageError(
            f"HF_ENDPOINT={shown[:60]!r} is not an http(s) address",
            hint="set it like https://huggingface.co (or unset it)",
        )
    return value


def hf_cache_dir() -> Path:
    """The shared Hugging Face hub cache, by huggingface_hub's precedence, read when called.

    huggingface_hub reads these once at import; localmix passes the result explicitly so that
    a process (or a test) that changes HF_HOME later still agrees with every other HF tool.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        hf_home = str(Path(xdg) / "huggingface")
    return Path(os.path.expandvars(hf_home)).expanduser() / "hub"


def listed(name: str) -> tuple[str, ...]:
    """A comma-separated environment variable's items, stripped, empty ones dropped."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())

"""Every setting and environment variable, with its default; read when called, never at import."""

from __future__ import annotations

import os
from pathlib import Path

# name -> help; the CLI's `--help` epilog and the README list these.
ENVIRONMENT = {
    "LOCALMIX_HOME": "where models, manifests, temporary files and bench history live "
    "(default: the platform's user data directory)",
    "LOCALMIX_THREADS": "threads for generation (default: physical cores)",
    "LOCALMIX_DEBUG": "set to 1 to show tracebacks",
    "HF_HOME": "the shared Hugging Face cache, where downloads stay",
    "HF_TOKEN": "Hugging Face token for gated repositories",
    "HF_HUB_OFFLINE": "set to 1 to never touch the network",
    "HF_ENDPOINT": "the Hub's address (default https://huggingface.co)",
}


def home() -> Path:
    """The localmix home directory (not created here)."""
    value = os.environ.get("LOCALMIX_HOME")
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("localmix", appauthor=False))


def models_dir() -> Path:
    return home() / "models"


def manifests_dir() -> Path:
    return home() / "manifests"


def tmp_dir() -> Path:
    return home() / "tmp"


def bench_history_path() -> Path:
    return home() / "bench" / "history.jsonl"


def user_catalog_path() -> Path:
    return home() / "models.toml"


def synth_dir() -> Path:
    """Where the demo and `localmix synth` keep synthetic checkpoints."""
    return home() / "synth"


def debug() -> bool:
    return os.environ.get("LOCALMIX_DEBUG", "") not in ("", "0", "false")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def default_threads() -> int:
    """Threads for generation: LOCALMIX_THREADS, else the physical core count (llama.cpp's rule)."""
    value = os.environ.get("LOCALMIX_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            pass
    count = os.cpu_count() or 1
    # Hyper-threads slow generation down; llama.cpp defaults to physical cores too.
    return max(1, count // 2) if count >= 8 else count


def hf_endpoint() -> str:
    """The Hub's address: HF_ENDPOINT, else https://huggingface.co (huggingface_hub's rule)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


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

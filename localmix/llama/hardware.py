"""What this machine offers llama.cpp: backends, devices and their memory, threads, RAM, bandwidth."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from localmix.llama import lib

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "ROCm", "HIP", "SYCL", "OpenCL", "MUSA", "CANN")
_REBUILD = (
    'CMAKE_ARGS="-DGGML_{flag}=on" pip install --force-reinstall --no-cache-dir '
    f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
)


@dataclass(frozen=True)
class Device:
    """A device llama.cpp can place tensors on; memory in bytes."""

    name: str
    description: str
    kind: str  # "cpu" | "gpu" | "igpu" | "accel"
    backend: str
    total_bytes: int
    free_bytes: int
    buffer_type: str


@dataclass(frozen=True)
class Amx:
    """Intel AMX as the loaded llama.cpp meets it.

    ggml's AMX kernels are compiled into a native build on an AMX CPU (Sapphire Rapids and later
    Xeons), and llama.cpp then places K-quant and Q4/Q8 weights in its "AMX" buffer type, first
    among the CPU's extra buffer types. On some such hosts (cloud VMs) those kernels fault at the
    first decode (llama.cpp #20824, ollama #17006): load.weight_repack keeps weights out of them."""

    kernels: bool = False  # the build has ggml's AMX kernels (AMX_INT8 among its CPU features)
    cpu: bool = False  # the CPU reports AMX (amx_int8 / amx_tile flags)
    buffer: bool = False  # llama.cpp offers its AMX buffer type for weights here

    @property
    def summary(self) -> str:
        build = "has AMX kernels" if self.kernels else "no AMX kernels"
        cpu = "has AMX" if self.cpu else "no AMX"
        return f"build: {build}; CPU: {cpu}"


def _cpu_has_amx() -> bool:
    """The CPU's own word: /proc/cpuinfo's amx_int8 flag (Linux); False elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return "amx_int8" in value.split()
    return False


@functools.lru_cache(maxsize=1)
def amx() -> Amx:
    """AMX on this machine and build (cached: neither changes while a process runs)."""
    return Amx(
        kernels=lib.cpu_features().get("AMX_INT8") == "1",
        cpu=_cpu_has_amx(),
        buffer="AMX" in lib.extra_buffer_types(),
    )


@dataclass(frozen=True)
class Hardware:
    """The machine as the plan sees it. Bytes for memory, GB/s (10^9) for bandwidth."""

    system: str  # "Linux", "Darwin", "Windows"
    machine: str  # "x86_64", "arm64"
    backends: tuple[str, ...]  # compiled into the loaded llama.cpp: "CPU", "CUDA", "Metal", ...
    devices: tuple[Device, ...]
    gpu_offload: bool  # llama_supports_gpu_offload()
    system_info: str
    threads_logical: int
    threads_physical: int
    ram_total: int
    ram_available: int
    bandwidth_gbs: float
    apple_silicon: bool
    unified_memory: bool  # GPU memory is system RAM (Apple Silicon, integrated GPUs)
    gpu_hardware: str | None  # a GPU found outside llama.cpp ("nvidia", "apple"), if any
    rebuild_command: str | None  # set when a GPU is present but this build cannot use it
    amx: Amx = Amx()
    extra_buffer_types: tuple[str, ...] = ()  # the CPU's, in llama.cpp's order ("CPU_REPACK")

    @property
    def gpus(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.kind in ("gpu", "igpu"))

    @property
    def cpu_features(self) -> tuple[str, ...]:
        """The CPU features this build uses (AVX2, FMA, ...), from llama_print_system_info."""
        for line in self.system_info.splitlines():
            if line.startswith("CPU"):
                pairs = (item.partition("=") for item in line.partition(":")[2].split("|"))
                return tuple(k.strip() for k, _, v in pairs if v.strip() == "1")
        return ()


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux); empty elsewhere."""
    values: dict[str, int] = {}
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def _sysctl(name: str) -> int | None:
    try:
        out = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True
        )
        return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def ram() -> tuple[int, int]:
    """(total, available) system memory in bytes."""
    info = _meminfo()
    if "MemTotal" in info:
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    total = _sysctl("hw.memsize") if platform.system() == "Darwin" else None
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 0
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        available = total
    return total, available


def _physical_cores() -> int:
    logical = os.cpu_count() or 1
    if platform.system() == "Darwin":
        return _sysctl("hw.physicalcpu") or logical
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return logical
    cores, physical = set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return min(logical, len(cores)) if cores else logical


def measure_bandwidth(n_bytes: int = 256 * 1024 * 1024, repeats: int = 3) -> float:
    """Memory bandwidth in GB/s: the best of a few numpy copies (read + write counted)."""
    import numpy as np

    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def _gpu_hardware(system: str, machine: str) -> str | None:
    if system == "Darwin" and machine == "arm64":
        return "apple"
    if shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists():
        return "nvidia"
    return None


def rebuild_command(gpu_hardware: str | None, backends: tuple[str, ...]) -> str | None:
    """The pip command that rebuilds llama-cpp-python for the GPU found, if this build lacks it."""
    if gpu_hardware is None or any(b in _GPU_BACKENDS for b in backends):
        return None
    return _REBUILD.format(flag="METAL" if gpu_hardware == "apple" else "CUDA")


def recommended_working_set(ram_total: int) -> int:
    """Metal's default GPU working set on Apple Silicon, in bytes: ~2/3 of RAM, 3/4 above 36 GiB."""
    return ram_total * 3 // 4 if ram_total > 36 * 1024**3 else ram_total * 2 // 3


def probe(*, bandwidth: bool = True) -> Hardware:
    """Look at the machine and the loaded llama.cpp build (about a second with bandwidth)."""
    system, machine = platform.system(), platform.machine()
    found = tuple(
        Device(
            name=d.name,
            description=d.description,
            kind=d.kind,
            backend=d.backend,
            total_bytes=d.total_bytes,
            free_bytes=d.free_bytes,
            buffer_type=d.buffer_type,
        )
        for d in lib.devices()
    )
    backends = lib.backends()
    apple = system == "Darwin" and machine == "arm64"
    total, available = ram()
    gpu = _gpu_hardware(system, machine)
    return Hardware(
        system=system,
        machine=machine,
        backends=backends,
        devices=found,
        gpu_offload=lib.supports_gpu_offload(),
        system_info=lib.system_info(),
        threads_logical=os.cpu_count() or 1,
        threads_physical=_physical_cores(),
        ram_total=total,
        ram_available=available,
        bandwidth_gbs=round(measure_bandwidth(), 1) if bandwidth else 0.0,
        apple_silicon=apple,
        unified_memory=apple or any(d.kind == "igpu" for d in found),
        gpu_hardware=gpu,
        rebuild_command=rebuild_command(gpu, backends),
        amx=amx(),
        extra_buffer_types=lib.extra_buffer_types(),
    )

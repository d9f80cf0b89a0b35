"""The GPU check: localmix's GPU path proved in one command, on a machine with an NVIDIA GPU and
no network, against llama.cpp's own llama-bench from the same build.

    python benchmarks/gpu_check.py prepare        # here, with PyPI: .gpu/ (pruned sdist, wheels)
    python3 benchmarks/gpu_check.py run           # there, from the repository root (carry .gpu)
    python benchmarks/gpu_check.py run --rehearse # any CPU machine: the same steps, small models

`run` installs llama-cpp-python from the pinned sdist with CUDA the way the README tells users
(CMAKE_ARGS="-DGGML_CUDA=on" pip install ...), keeping the build tree to add llama-bench to it;
installs localmix from the checkout (dependencies from the carried wheels); writes Mistral 7B-
and Mixtral 8x7B-shaped Q4_K_M files while the build runs; then measures, each in its own
process with the GPU's memory sampled: localmix bench vs llama-bench (pp512, tg128), localmix chat
generation vs llama-bench tg256, planned vs measured VRAM (7B full offload; Mixtral under a 24 GiB
budget), and the automatic MoE plan vs llama-bench sweeps of -ngl and -ncmoe under that budget.
It also records why the C++ runtime crash happened (symbols, dynamic-linker bindings with the fix
turned off). Every stage rewrites OUT/results.json and OUT/summary.md, so a kill keeps what ran.

The rehearsal uses the installed localmix and llama_cpp, tiny models of the same structure and
the CPU; llama-bench is a built one if --llama-bench names it, else `localmix bench` stands in
(it prints llama-bench's JSON), marked as such in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from llamacpp_tools import cache_dir, pinned_version  # noqa: E402 - the sibling script, stdlib only

PREPARED = REPO / ".gpu"
MIB = 1024**2
STORY = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
# Packages the GPU image already has at versions localmix accepts: not carried (size limit).
IMAGE_HAS = ("numpy", "pillow", "hf-xet", "hf_xet")
# Prune from the sdist what a CUDA build never reads (the tarball must travel in 64 MiB).
PRUNE = (
    ".git", ".github", "docs", "examples", "tests", "docker",
    "vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/media",
    "vendor/llama.cpp/benches", "vendor/llama.cpp/examples", "vendor/llama.cpp/gguf-py",
    "vendor/llama.cpp/tests", "vendor/llama.cpp/tools/ui", "vendor/llama.cpp/tools/server",
    "vendor/llama.cpp/.github",
)  # fmt: skip
KEEP_BACKENDS = ("ggml-cpu", "ggml-cuda")
# Build options beyond the README's -DGGML_CUDA=on, for build time only: the GPU at hand, the
# f16 flash-attention kernels (the KV cache these runs use) and no fatbin compression.
FAST_BUILD = ("-DGGML_CUDA_FA_QUANTS=f16-f16", "-DGGML_CUDA_COMPRESSION_MODE=none")


# ---- prepare (here, with PyPI) ------------------------------------------------------------


def requirements() -> list[str]:
    """localmix's runtime requirements without the engine (built there), plus the engine's own
    requirements and what building it needs."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [r for r in project["dependencies"] if not r.startswith("llama-cpp-python")]
    wanted = [r for r in wanted if "python_version < '3.11'" not in r]
    return [*wanted, "typing-extensions>=4.5", "diskcache>=5.6", "jinja2>=2.11",
            "scikit-build-core[pyproject]>=0.9.2", "pip", "setuptools>=68", "wheel"]  # fmt: skip


def prune_sdist(archive: Path, dest: Path) -> Path:
    """The sdist without docs, tests, models and other backends, as a new tar.gz in dest."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        top = next(p for p in Path(tmp).iterdir() if p.is_dir())
        for rel in PRUNE:
            shutil.rmtree(top / rel, ignore_errors=True)
        for backend in (top / "vendor/llama.cpp/ggml/src").glob("ggml-*/"):
            if backend.name not in KEEP_BACKENDS:
                shutil.rmtree(backend)
        out = dest / archive.name
        with tarfile.open(out, "w:gz") as packed:
            packed.add(top, arcname=top.name)
    return out


def prepare(dest: Path = PREPARED) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    wheels = dest / "wheels"
    wheels.mkdir(parents=True)
    version = pinned_version()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", tmp, f"llama-cpp-python=={version}"],
            check=True,
        )  # fmt: skip
        sdist = prune_sdist(next(Path(tmp).glob("*.tar.gz")), dest)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)]
    platforms += ["manylinux2014_x86_64", "manylinux1_x86_64"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheels),
         "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
         *[f"--platform={p}" for p in platforms], *requirements()],
        check=True,
    )  # fmt: skip
    for wheel in wheels.glob("*.whl"):
        if wheel.name.split("-")[0].lower().replace("_", "-") in IMAGE_HAS:
            wheel.unlink()
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(
        f"{dest}: {sdist.name} and {len(list(wheels.glob('*.whl')))} wheels, {total / MIB:.1f} MiB"
    )
    print("carry it: run(carry=['.gpu'], command='python3 benchmarks/gpu_check.py run')")


# ---- measuring one command -------------------------------------------------------------------


def _smi(*args: str) -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([smi, *args], capture_output=True, text=True, timeout=10)
        return [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return []


def gpu_used_mib() -> int | None:
    lines = _smi("--query-gpu=memory.used", "--format=csv,noheader,nounits")
    try:
        return int(float(lines[0]))
    except (IndexError, ValueError):
        return None


class MemoryWatch:
    """The GPU's memory.used, sampled every 100 ms by nvidia-smi while a command runs."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        smi = shutil.which("nvidia-smi")
        if smi:
            self.proc = subprocess.Popen(
                [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(int(float(line.strip())))

    def stop(self) -> int | None:
        if self.proc is not None:
            time.sleep(0.25)
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(3)
        if self.thread is not None:
            self.thread.join(2)
        return max(self.samples) if self.samples else None


@dataclass
class Run:
    name: str
    cmd: list[str]
    rc: int
    seconds: float
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    vram_mib: int | None = None  # peak memory.used minus the baseline before the command

    def json(self) -> Any:
        """The command's stdout as JSON (localmix --json, llama-bench -o json), or None."""
        with contextlib.suppress(ValueError):
            return json.loads(self.stdout)
        return None


# ---- the check ------------------------------------------------------------------------------


class Check:
    def __init__(self, out: Path, work: Path, budget_s: float, rehearse: bool) -> None:
        self.out, self.work, self.rehearse = out, work, rehearse
        self.raw = work / "raw"  # every command's output; packed into OUT/raw.tgz at each stage
        self.raw.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.results: dict[str, Any] = {"stages": {}, "runs": {}, "rehearse": rehearse}
        self.log = (out / "log.txt").open("a")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        self.env["LOCALMIX_HOME"] = str(work / "home")
        self.python = sys.executable
        self.llama_bench: list[str] = []
        self.threads = physical_cores()
        self.repack: bool | None = None  # localmix's CPU rule here (stage_cpu_rule asks it)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"started_s": round(time.monotonic() - self.t0, 1)}
        self.results["stages"][name] = record
        self.say(f"=== {name} ({self.left():.0f} s left)")
        start = time.monotonic()
        try:
            yield record
            record["ok"] = True
        except Exception as exc:  # a stage fails alone; later stages use what exists
            record["ok"] = False
            record["error"] = f"{type(exc).__name__}: {exc}"
            self.say(f"stage {name} failed: {record['error']}")
            self.log.write(traceback.format_exc())
        finally:
            record["seconds"] = round(time.monotonic() - start, 1)
            self.save()

    def run(self, name: str, cmd: Sequence[str], timeout: float = 120, *,
            env: dict[str, str] | None = None, vram: bool = True) -> Run:  # fmt: skip
        timeout = max(5.0, min(timeout, self.left() - 5))
        self.say(f"run {name}: {' '.join(cmd)}")
        baseline = gpu_used_mib() if vram else None
        watch = MemoryWatch() if vram and baseline is not None else None
        start = time.monotonic()
        try:
            done = subprocess.run(
                list(cmd), capture_output=True, text=True, timeout=timeout,
                env=env or self.env, stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
            rc, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stdout, stderr = 124, _text(exc.stdout), _text(exc.stderr) + "\n[timed out]"
        seconds = time.monotonic() - start
        peak = watch.stop() if watch else None
        result = Run(name, list(cmd), rc, round(seconds, 2), stdout, stderr)
        if peak is not None and baseline is not None:
            result.vram_mib = peak - baseline
        (self.raw / f"{name}.out").write_text(stdout)
        (self.raw / f"{name}.err").write_text(stderr)
        record = {k: v for k, v in asdict(result).items() if k not in ("stdout", "stderr")}
        self.results["runs"][name] = record
        tail = " | ".join(stderr.strip().splitlines()[-3:]) if rc else ""
        self.say(f"  -> rc {rc} in {seconds:.1f}s, VRAM {result.vram_mib} MiB {tail[:300]}")
        return result

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        for _ in range(3):  # the build thread may add a record meanwhile: try again
            with contextlib.suppress(RuntimeError):
                text = json.dumps(self.results, indent=1, default=str)
                table = summary(self.results)
                break
        else:
            return
        (self.out / "results.json").write_text(text)
        (self.out / "summary.md").write_text(table)
        with tarfile.open(self.out / "raw.tgz", "w:gz") as packed:
            packed.add(self.raw, arcname="raw")

    def llama_bench_cmd(self, model: Path, *flags: str) -> list[str]:
        """llama-bench on model; in a rehearsal without one, `localmix bench` (same JSON)."""
        if self.llama_bench:
            # the weight-repacking setting localmix uses on this host, so both run one kernel
            repack = [] if self.repack is None else ["--repack", str(int(self.repack))]
            return [*self.llama_bench, "-m", str(model), *flags, *repack]
        renamed = ["--n-cpu-moe" if f == "-ncmoe" else f for f in flags]
        return self.localmix("bench", str(model), "--no-save", *renamed)

    def localmix(self, *args: str) -> list[str]:
        return [self.python, "-m", "localmix", *args]


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def physical_cores() -> int:
    """Physical cores (llama-bench's and localmix's default thread count is per core)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["lscpu", "-p=Core,Socket"], capture_output=True, text=True)
        cores = {line for line in done.stdout.splitlines() if line and not line.startswith("#")}
        if cores:
            return len(cores)
    return os.cpu_count() or 1


# ---- stages -----------------------------------------------------------------------------------


def stage_env(check: Check) -> None:
    with check.stage("env") as record:
        gpu = _smi(
            "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"
        )
        record["gpu"] = gpu[0] if gpu else None
        record["nproc"] = os.cpu_count()
        record["threads"] = check.threads
        record["python"] = sys.version.split()[0]
        nvcc = find_nvcc()
        record["nvcc"] = str(nvcc) if nvcc else None
        if nvcc:
            version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True)
            record["nvcc_version"] = version.stdout.strip().splitlines()[-1:]
        record["cmake"] = shutil.which("cmake")
        record["ninja"] = shutil.which("ninja")


def find_nvcc() -> Path | None:
    names = [os.environ.get("CUDACXX", ""), "/usr/local/cuda/bin/nvcc", shutil.which("nvcc") or ""]
    names += sorted((str(p) for p in Path("/usr/local").glob("cuda-*/bin/nvcc")), reverse=True)
    for name in names:
        if name and Path(name).is_file():
            return Path(name).resolve()
    return None


def _site_dirs() -> list[Path]:
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(d) for d in dirs if (Path(d) / "nvidia").is_dir()]


def cuda_cmake_args(links: Path) -> tuple[list[str], list[str]]:
    """CMake arguments that find CUDA here, and the library folders the loader needs.

    Images with CUDA from pip (nvidia-* wheels) keep cuBLAS outside the toolkit: point CMake's
    FindCUDAToolkit at it through a folder of links (unversioned and soname names)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("no nvcc found (set CUDACXX)")
    root = nvcc.parent.parent
    args = [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={root}"]
    lib_dirs = [root / "lib64", root / "lib", *root.glob("targets/*/lib")]
    inc_dirs = [root / "include", *root.glob("targets/*/include")]
    for site_dir in _site_dirs():
        lib_dirs += [*site_dir.glob("nvidia/cu*/lib"), *site_dir.glob("nvidia/*/lib")]
        inc_dirs += [*site_dir.glob("nvidia/cu*/include"), *site_dir.glob("nvidia/*/include")]
    links.mkdir(parents=True, exist_ok=True)
    (links / "include").mkdir(exist_ok=True)

    def find(name: str) -> Path | None:
        for folder in lib_dirs:
            found = sorted(folder.glob(f"{name}.so*"))
            if found:
                return found[0].resolve()
        return None

    def link(name: str, path: Path) -> Path:
        for alias in {f"{name}.so", path.name, _soname(path)} - {""}:
            (links / alias).unlink(missing_ok=True)
            (links / alias).symlink_to(path)
        return links / f"{name}.so"

    # the driver library (for CUDA VMM): the system's own first, the toolkit's stub last
    system = [Path(d) for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64",
                                "/usr/local/nvidia/lib", "/usr/lib/wsl/lib")]  # fmt: skip
    driver = next((found for d in system for found in sorted(d.glob("libcuda.so*"))), None)
    driver = driver or next(iter(sorted(root.glob("**/stubs/libcuda.so"))), None)
    if driver is not None:
        args.append(f"-DCUDA_cuda_driver_LIBRARY={link('libcuda', driver.resolve())}")
    else:
        args.append("-DGGML_CUDA_NO_VMM=ON")  # builds without the driver library at link time
    header = next((d for d in inc_dirs if (d / "cublas_v2.h").is_file()), None)
    toolkit_has_cublas = header is not None and header.is_relative_to(root)
    if not toolkit_has_cublas:
        for name, var in (("libcublas", "cublas"), ("libcublasLt", "cublasLt"),
                          ("libcudart", "cudart")):  # fmt: skip
            path = find(name)
            if path is not None:
                args.append(f"-DCUDA_{var}_LIBRARY={link(name, path)}")
        if header is not None:
            for h in header.glob("cublas*.h"):
                (links / "include" / h.name).unlink(missing_ok=True)
                (links / "include" / h.name).symlink_to(h)
            args.append(f"-DCMAKE_CUDA_FLAGS=-I{links / 'include'}")
    folders = dict.fromkeys([str(links), *(str(d) for d in lib_dirs if d.is_dir())])
    return args, list(folders)


def _soname(path: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["objdump", "-p", str(path)], capture_output=True, text=True)
        match = re.search(r"SONAME\s+(\S+)", done.stdout)
        if match:
            return match[1]
    return ""


def stage_python(check: Check, prepared: Path) -> None:
    """A venv over the image's packages; the carried wheels; localmix from the checkout."""
    with check.stage("python") as record:
        venv = check.work / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
            check=True,
        )
        python = str(venv / "bin" / "python")
        if sys.prefix != sys.base_prefix:
            # the image's Python is itself a venv, whose packages (numpy, ...) a venv made from it
            # does not see: a .pth adds them after the new venv's own
            import site

            found = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                   capture_output=True, text=True, check=True)  # fmt: skip
            own = Path(found.stdout.strip())
            (own / "_image_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
            record["image_packages"] = site.getsitepackages()
        wheels = sorted((prepared / "wheels").glob("*.whl"))
        pip_wheel = next(w for w in wheels if w.name.startswith("pip-"))
        # pip runs from its own wheel, so an image Python without pip works too
        installed = check.run(
            "pip_wheels",
            [python, f"{pip_wheel}/pip", "install", "-q", "--no-index", "--no-deps",
             "--no-compile", *map(str, wheels)],
            timeout=180, vram=False,
        )  # fmt: skip
        if installed.rc:
            raise RuntimeError("installing the carried wheels failed")
        editable = check.run(
            "pip_localmix",
            [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             "--no-build-isolation", "-e", str(REPO)],
            timeout=120, vram=False,
        )  # fmt: skip
        record["localmix_editable"] = editable.rc == 0
        if editable.rc:  # still importable from the checkout
            check.env["PYTHONPATH"] = str(REPO)
        check.python = python


def build_engine(check: Check, prepared: Path, record: dict[str, Any], cuda: bool = True) -> None:
    """pip-install the pinned sdist with CUDA (README's way), keep the build, add llama-bench.
    cuda False rehearses the same steps on a machine without CUDA."""
    sdist = next(prepared.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(check.work, filter="data")
    src = check.work / sdist.name.removesuffix(".tar.gz")
    build = check.work / "build"
    cmake_args: list[str] = []
    lib_dirs: list[str] = []
    if cuda:
        cuda_args, lib_dirs = cuda_cmake_args(check.work / "cuda-links")
        caps = _smi("--query-gpu=compute_cap", "--format=csv,noheader")
        arch = caps[0].replace(".", "") if caps and re.fullmatch(r"\d+\.\d+", caps[0]) else "native"
        cmake_args = [
            "-DGGML_CUDA=on",
            f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
            *FAST_BUILD,
            *cuda_args,
        ]
    record["cmake_args"] = cmake_args
    env = dict(check.env, CMAKE_ARGS=shlex.join(cmake_args),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4))  # fmt: skip
    env["LD_LIBRARY_PATH"] = ":".join([*lib_dirs, env.get("LD_LIBRARY_PATH", "")])
    check.env["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"]
    pip = check.run(
        "build_pip",
        [check.python, "-m", "pip", "install", "-v", "--no-index", "--no-deps",
         "--no-build-isolation", "-C", f"build-dir={build}", str(src)],
        timeout=check.left() - 150, env=env, vram=False,  # the measurements need ~150 s after
    )  # fmt: skip
    if pip.rc and "[1/" not in pip.stdout:  # failed before compiling: the older toolchain way
        fallback = ["-DGGML_CUDA_NO_VMM=ON", f"-DCMAKE_CUDA_HOST_COMPILER={shutil.which('g++')}"]
        flags = [a for a in cmake_args if a.startswith("-DCMAKE_CUDA_FLAGS=")]
        rest = [a for a in cmake_args if a not in flags and "cuda_driver" not in a]
        extra = " ".join(f.removeprefix("-DCMAKE_CUDA_FLAGS=") for f in flags)
        cmake_args = [*rest, *fallback, f"-DCMAKE_CUDA_FLAGS={extra} -allow-unsupported-compiler"]
        record["cmake_args_retry"] = cmake_args
        env["CMAKE_ARGS"] = shlex.join(cmake_args)  # scikit-build-core splits it with shlex
        shutil.rmtree(build, ignore_errors=True)
        pip = check.run("build_pip_retry", pip.cmd, timeout=check.left() - 150, env=env, vram=False)
    record["pip_rc"] = pip.rc
    if pip.rc:
        raise RuntimeError("pip install of llama-cpp-python with CUDA failed: see raw/build_pip")
    configure = check.run(
        "build_tools_configure",
        ["cmake", "-S", str(src), "-B", str(build), "-DLLAMA_BUILD_TOOLS=ON", "-DLLAVA_BUILD=OFF"],
        timeout=120, env=env, vram=False,
    )  # fmt: skip
    bench = check.run(
        "build_llama_bench",
        ["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(os.cpu_count())],
        timeout=240, env=env, vram=False,
    )  # fmt: skip
    found = sorted(build.rglob("llama-bench"))
    found = [p for p in found if p.is_file() and os.access(p, os.X_OK)]
    if configure.rc or bench.rc or not found:
        raise RuntimeError("building llama-bench failed: see raw/build_llama_bench")
    check.llama_bench = [str(found[0])]
    record["llama_bench"] = str(found[0])


def stage_models(check: Check, scale: str) -> dict[str, Path]:
    with check.stage("models") as record:
        candidates = [Path("/dev/shm"), check.work] if scale == "full" else [check.work]
        need = 34 * 1024**3 if scale == "full" else 0

        def room(folder: Path) -> int:  # free space, plus the files an earlier run left there
            made = folder / "lmx-models"
            kept = sum(f.stat().st_size for f in made.glob("*.gguf")) if made.is_dir() else 0
            return shutil.disk_usage(folder).free + kept

        folder = next((d for d in candidates if d.is_dir() and room(d) >= need), check.work)
        folder = folder / "lmx-models"
        made = check.run(
            "models",
            [check.python, str(REPO / "benchmarks" / "gpu_models.py"), str(folder), "--scale",
             scale],
            timeout=300, vram=False,
        )  # fmt: skip
        record["dir"] = str(folder)
        record["files"] = [json.loads(line) for line in made.stdout.splitlines() if line.strip()]
        if made.rc:
            raise RuntimeError("writing the models failed: see raw/models.err")
    return {name: folder / f"{name}.gguf" for name in ("7b", "mixtral", "125m")}


DIAG_SCRIPT = """
import sys
from localmix.llama import backend
mode, args = sys.argv[1], sys.argv[2:]
if mode in ("off", "script"):  # the state before the fix: llama_cpp imported as any script would
    backend.cxx_runtime_global = lambda: None
if mode == "script":  # the short script that loaded fine before the fix
    from localmix.llama.engine import Engine, EngineConfig
    Engine(EngineConfig(model_path=args[1], n_ctx=256, n_gpu_layers=99)).close()
    print("loaded")
else:
    from localmix.cli.app import main
    main(args)
"""


def stage_check(check: Check, model: Path) -> None:
    """The build sees the GPU; what libggml-cuda exports; the crash with the fix off and on."""
    with check.stage("check") as record:
        doctor = check.run("doctor", check.localmix("doctor", "--json"), timeout=60, vram=False)
        data = doctor.json() or {}
        record["devices"] = [d.get("name") for d in data.get("devices", [])]
        record["gpu_seen"] = any(d.get("kind") == "gpu" for d in data.get("devices", []))
        lib = _lib_dir(check)
        cuda_lib = next(iter(sorted(lib.glob("libggml-cuda.so*"))), None) if lib else None
        if cuda_lib is not None:
            record["libggml_cuda_exports"] = cxx_exports(cuda_lib)
            ldd = subprocess.run(["ldd", str(cuda_lib)], capture_output=True, text=True,
                                 env=check.env, check=False)  # fmt: skip
            record["libggml_cuda_ldd"] = ldd.stdout.strip().splitlines()
        chat = ["chat", str(model), "hi", "-n", "4", "--json", "--format", "v1", "--ctx", "256"]
        for mode in ("off", "script", "on"):
            env = dict(check.env, LD_DEBUG="scopes,bindings",
                       LD_DEBUG_OUTPUT=str(check.work / f"ld-{mode}"))  # fmt: skip
            done = check.run(f"diag_fix_{mode}", [check.python, "-c", DIAG_SCRIPT, mode, *chat],
                             timeout=45, env=env)  # fmt: skip
            record[f"cli_fix_{mode}_rc"] = done.rc
            record[f"bindings_fix_{mode}"] = bindings(check.work, f"ld-{mode}")


def _lib_dir(check: Check) -> Path | None:
    done = subprocess.run(
        [check.python, "-c", "import llama_cpp.llama_cpp as c; print(c._base_path)"],
        capture_output=True, text=True, env=check.env, check=False,
    )  # fmt: skip
    return Path(done.stdout.strip()) if done.returncode == 0 else None


def cxx_exports(library: Path) -> dict[str, Any]:
    """How much C++ runtime code a library exports: std:: symbols it defines, and libstdc++'s
    own internals (codecvt, locale) that only a static copy of the runtime would carry."""
    if not (shutil.which("nm") and shutil.which("c++filt")):
        return {"error": "no nm / c++filt here"}
    done = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    names = [line.split()[-1] for line in done.stdout.splitlines() if line.strip()]
    std = [n for n in names if n.startswith(("_ZNSo", "_ZNSt", "_ZSt", "_ZNKSt"))]
    demangled = subprocess.run(["c++filt"], input="\n".join(std[:4000]), capture_output=True,
                               text=True, check=False).stdout.splitlines()  # fmt: skip
    return {
        "std_symbols": len(std),
        "has_M_insert_long": "_ZNSo9_M_insertIlEERSoT_" in names,
        "codecvt_or_locale": sum("codecvt" in d or "locale" in d for d in demangled),
        "examples": demangled[:12],
    }


def bindings(work: Path, prefix: str) -> list[str]:
    """Where the canary C++ runtime call was bound, and the lookup scopes of the libraries
    involved (libllama, libggml, libggml-cuda, libstdc++), from the dynamic linker's own log."""
    libraries = ("libllama.so", "libggml.so", "libggml-cuda.so", "libstdc++.so")
    keep: list[str] = []
    for log in sorted(work.glob(f"{prefix}.*")):
        follow = 0
        for raw in log.read_text(errors="replace").splitlines():
            line = re.sub(r"^\s*\d+:\s*", "", raw).strip()
            if line.startswith("object="):
                follow = 2 if any(name in line for name in libraries) else 0
                if follow:
                    keep.append(line)
            elif follow and line.startswith("scope"):
                keep.append(line)
                follow -= 1
            elif ("_M_insertI" in line or "_ZNSols" in line) and any(
                name in line.split(" to ")[0] for name in libraries
            ):
                keep.append(line)  # a C++ runtime call from one of ours: where did it bind?
        log.unlink()
    return keep[:120]


def llama_bench_rows(run: Run) -> dict[str, dict[str, Any]]:
    """llama-bench -o json rows by test name (pp512, tg128)."""
    rows = run.json() if run.rc == 0 else None
    out: dict[str, dict[str, Any]] = {}
    for row in rows or []:
        test = f"pp{row['n_prompt']}" if row.get("n_prompt") else f"tg{row['n_gen']}"
        out[test] = {"avg_ts": row.get("avg_ts"), "stddev_ts": row.get("stddev_ts")}
    return out


def plan_json(check: Check, model: Path, ctx: int, **settings: Any) -> dict[str, Any]:
    args = ["plan", str(model), "--ctx", str(ctx)]
    for key, value in settings.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run([check.python, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, env=check.env, check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"plan failed: {done.stderr.strip()[-300:]}")
    return dict(json.loads(done.stdout))


def stage_7b(
    check: Check, model: Path, p: int, n: int, reps: int, rounds: int, chat_n: int
) -> None:
    with check.stage("7b") as record:
        record["plan"] = plan_json(check, model, ctx=max(p, n), ngl=-1)
        check.results["tests"] = {"pp": f"pp{p}", "tg": f"tg{n}", "chat": f"tg{chat_n}"}
        t = str(check.threads)
        for r in range(1, rounds + 1):
            if check.left() < 120:
                break
            lb = check.run(f"7b_llama_bench_r{r}", check.llama_bench_cmd(
                model, "-ngl", "99", "-p", str(p), "-n", f"{n},{chat_n}", "-r", str(reps), "-t", t,
                "-o", "json"))  # fmt: skip
            lm = check.run(f"7b_localmix_bench_r{r}", check.localmix(
                "bench", str(model), "-ngl", "99", "-p", str(p), "-n", str(n), "-r", str(reps),
                "-t", t, "-o", "json", "--no-save"))  # fmt: skip
            record[f"r{r}"] = {"llama_bench": llama_bench_rows(lb),
                               "localmix": llama_bench_rows(lm),
                               "vram_llama_bench": lb.vram_mib, "vram_localmix": lm.vram_mib}  # fmt: skip
            for mode, flags in (("greedy", ["--temperature", "0", "--repeat-penalty", "1"]),
                                ("sampled", ["--seed", "1"])):  # fmt: skip
                chat = check.run(f"7b_chat_{mode}_r{r}", check.localmix(
                    "chat", str(model), STORY, "--format", "v1", "--json", "-n", str(chat_n),
                    "-t", t, "--ctx", "1024", *flags))  # fmt: skip
                stats = (chat.json() or {}).get("stats") or {}
                record[f"r{r}"][f"chat_{mode}"] = {
                    k: stats.get(k) for k in ("gen_tps", "generated_tokens", "prompt_tps")
                } | {"vram": chat.vram_mib}


def stage_mixtral(
    check: Check, model: Path, budget: str, p: int, n: int, reps: int, configs_max: int
) -> None:
    """The automatic plan under the budget against llama-bench's -ngl and -ncmoe sweeps."""
    with check.stage("mixtral") as record:
        ctx = max(p, n)
        auto = plan_json(check, model, ctx=ctx, vram_budget=budget)
        record["budget"], record["auto"] = budget, auto
        k, layers = auto.get("cpu_moe") or 0, auto["best_layer_split"]
        t = str(check.threads)
        lm = check.run("mixtral_localmix_auto", check.localmix(
            "bench", str(model), "--vram-budget", budget, "-p", str(p), "-n", str(n),
            "-r", str(reps), "-t", t, "-o", "json", "--no-save"))  # fmt: skip
        record["localmix_auto"] = {"rows": llama_bench_rows(lm), "vram": lm.vram_mib}
        # the plan's own placement first, then the neighbours that tell whether it is the best
        configs = [("ncmoe", k), ("ngl", layers), ("ncmoe", k - 1), ("ngl", layers + 1),
                   ("ncmoe", k + 1), ("ngl", layers - 1)][:configs_max]  # fmt: skip
        sweep = record.setdefault("sweep", [])
        for kind, value in configs:
            if value < 0 or check.left() < 45:
                continue
            flags = (
                ["-ngl", "99", "-ncmoe", str(value)] if kind == "ncmoe" else ["-ngl", str(value)]
            )
            planned = auto[f"planned_{kind}"].get(str(value)) or [None, None]
            lb = check.run(f"mixtral_llama_bench_{kind}{value}", check.llama_bench_cmd(
                model, *flags, "-p", str(p), "-n", str(n), "-r", str(reps), "-t", t,
                "-o", "json"))  # fmt: skip
            sweep.append({"kind": kind, "value": value, "rows": llama_bench_rows(lb),
                          "vram": lb.vram_mib, "planned_mib": planned[0],
                          "planned_fits": planned[1]})  # fmt: skip
            check.save()


CHAT_MODES = {
    "greedy": ("--temperature", "0", "--repeat-penalty", "1"),
    "greedy_penalty": ("--temperature", "0"),
    "sampled": ("--seed", "7"),
}


def stage_cpu_chat(check: Check, model: Path, rounds: int, chat_n: int) -> None:
    """`localmix chat` on the CPU, 1 thread, against llama-bench tg on the same file: on a
    quiet many-core machine, where a shared 2-core one cannot say whether a few % are real."""
    with check.stage("cpu_chat") as record:
        for r in range(1, rounds + 1):
            if check.left() < 30:
                break
            lb = check.run(f"cpu_llama_bench_r{r}", check.llama_bench_cmd(
                model, "-ngl", "0", "-p", "0", "-n", str(chat_n), "-r", "3", "-t", "1",
                "-o", "json"), vram=False)  # fmt: skip
            row: dict[str, Any] = {"llama_bench": llama_bench_rows(lb)}
            for mode, flags in CHAT_MODES.items():
                chat = check.run(f"cpu_chat_{mode}_r{r}", check.localmix(
                    "chat", str(model), STORY, "--format", "v1", "--json", "-n", str(chat_n),
                    "-t", "1", "-ngl", "0", "--ctx", "1024", *flags), vram=False)  # fmt: skip
                stats = (chat.json() or {}).get("stats") or {}
                row[mode] = {k: stats.get(k) for k in ("gen_tps", "generated_tokens")}
            record[f"r{r}"] = row
            check.save()


def stage_cpu_rule(check: Check, model: Path) -> None:
    """The AMX rule on this host (GPU machines are often Sapphire Rapids Xeons): what doctor says
    of AMX and repacking, a Q4_K_M decode on the CPU with localmix's setting (must live) and one
    with --repack forced (whether this host's AMX kernels crash: the evidence for the rule)."""
    with check.stage("cpu_rule") as record:
        doctor = check.run("cpu_rule_doctor", check.localmix("doctor", "--json"), vram=False)
        facts = doctor.json() or {}
        record["amx"], record["repack"] = facts.get("amx"), facts.get("repack")
        check.repack = (facts.get("repack") or {}).get("on")
        for name, flags in (("default", []), ("forced_repack", ["--repack"])):
            chat = check.run(f"cpu_rule_chat_{name}", check.localmix(
                "chat", str(model), "Hello", "--json", "-n", "16", "-t", "2", "-ngl", "0",
                "--temperature", "0", "--ctx", "512", *flags), vram=False)  # fmt: skip
            stats = (chat.json() or {}).get("stats") or {}
            record[name] = {"rc": chat.rc, "signal": -chat.rc if chat.rc < 0 else None,
                            "generated_tokens": stats.get("generated_tokens")}  # fmt: skip
        check.save()


COMPARE_IMATRIX = """
import json, sys
import numpy as np
from localmix.build.imatrix.files import load
a, b = load(sys.argv[1]), load(sys.argv[2])
worst = 0.0
for name, x in a.values.items():
    y = b.values[name]
    worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30))))
print(json.dumps({"tensors": len(a.values), "same_tensors": sorted(a.values) == sorted(b.values),
                  "max_rel_diff": worst, "chunks": [a.chunks, b.chunks]}))
"""


def stage_features(check: Check, model: Path) -> None:
    """What sessions without a GPU could not run: `localmix imatrix` reading activations from
    device memory (its tap), and `localmix eval` with both models on the GPU, each against the
    same command on the CPU (-ngl 0) on the same file; plus `localmix serve` answering on the GPU."""
    with check.stage("features") as record:
        folder = check.work / "features"
        folder.mkdir(parents=True, exist_ok=True)
        matrices = {}
        for where, ngl in (("gpu", "99"), ("cpu", "0")):
            out = folder / f"{where}.imatrix.gguf"
            done = check.run(f"imatrix_{where}", check.localmix(
                "imatrix", str(model), "--chunks", "4", "-ngl", ngl, "-o", str(out), "--json"),
                timeout=180)  # fmt: skip
            record[f"imatrix_{where}"] = done.json()
            matrices[where] = out
        same = check.run("imatrix_compare", [check.python, "-c", COMPARE_IMATRIX,
                         str(matrices["gpu"]), str(matrices["cpu"])], vram=False)  # fmt: skip
        record["imatrix_compare"] = same.json()
        reference = folder / "reference.Q8_0.gguf"
        check.run("reference_q8", check.localmix(
            "quantize", str(model), "-q", "Q8_0", "--allow-requantize", "-o", str(reference)),
            timeout=120, vram=False)  # fmt: skip
        for where, ngl in (("gpu", "99"), ("cpu", "0")):
            done = check.run(f"eval_{where}", check.localmix(
                "eval", str(model), "--against", str(reference), "--chunks", "4", "-ngl", ngl,
                "--json"), timeout=180)  # fmt: skip
            scores = (done.json() or {}).get("scores") or {}
            record[f"eval_{where}"] = {
                k: scores.get(k) for k in ("ppl", "ppl_ref", "kld_mean", "same_top", "n_tokens")
            }
        record["serve"] = serve_smoke(check, model)
        record["schema"] = schema_smoke(check, model, folder)
        record["tools"] = tools_smoke(check, folder)


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
    "required": ["name", "legs"], "additionalProperties": False,
}  # fmt: skip


def schema_smoke(check: Check, model: Path, folder: Path) -> dict[str, Any]:
    """`localmix chat --schema` with the model on the GPU: the grammar masks logits that come
    from device memory; the reply must parse and hold the schema's fields, seeds 1-3."""
    schema = folder / "animal.schema.json"
    schema.write_text(json.dumps(SCHEMA))
    valid = 0
    for seed in ("1", "2", "3"):
        done = check.run(f"schema_{seed}", check.localmix(
            "chat", str(model), "Describe a cat.", "--schema", str(schema), "--seed", seed,
            "-n", "120", "-ngl", "99"), timeout=120)  # fmt: skip
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            data = json.loads(done.stdout)
            valid += set(data) == {"name", "legs"} and 0 <= data["legs"] <= 8
    return {"runs": 3, "valid": valid}


SERVE_CLIENTS = """
import json, sys, threading, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
body = json.dumps({"model": sys.argv[3], "prompt": "Once upon a time", "max_tokens": 64,
                   "temperature": 0, "stream": False}).encode()
got = []
def one():
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        got.append(json.load(r)["usage"]["completion_tokens"])
start = time.monotonic()
threads = [threading.Thread(target=one) for _ in range(n)]
[t.start() for t in threads]; [t.join() for t in threads]
seconds = time.monotonic() - start
print(json.dumps({"clients": n, "answered": len(got), "tokens": sum(got),
                  "aggregate_tps": sum(got) / seconds}))
"""


@contextlib.contextmanager
def serving(check: Check, model: str, log_name: str) -> Iterator[str]:
    """`localmix serve MODEL -ngl 99` on a free port until the block ends; yields its URL."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (check.raw / log_name).open("w")
    server = subprocess.Popen(
        check.localmix("serve", model, "--port", str(port), "-ngl", "99"),
        env=check.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(20)
        if server.poll() is None:
            server.kill()
        log.close()


def serve_smoke(check: Check, model: Path) -> dict[str, Any]:
    """`localmix serve` with the model on the GPU, 1 and 8 concurrent clients (64 tokens each)."""
    result = {}
    with serving(check, str(model), "serve.log") as url:
        for n in (1, 8):
            done = check.run(f"serve_{n}", [check.python, "-c", SERVE_CLIENTS, url, str(n),
                             str(model)], timeout=150)  # fmt: skip
            result[f"clients_{n}"] = done.json()
    return result


MAKE_TOOLS_MODEL = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])  # the checkout: tests.tekken_files makes the model
from tests.tekken_files import random_model, shipped
path = random_model(Path(sys.argv[2]), shipped("mistral_instruct_tokenizer_241114.model.v7"), "v3")
print(json.dumps({"path": str(path)}))
"""

# one call each (parallel_tool_calls false): random weights could run a list of calls past the limit
TOOLS_CLIENTS = """
import json, sys, jsonschema, openai
url, model = sys.argv[1], sys.argv[2]
weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
           "required": ["city"], "additionalProperties": False}
tool = {"name": "get_weather", "strict": True, "parameters": weather}
animal = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
          "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
          "required": ["name", "legs"], "additionalProperties": False}
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
ask = "Weather in Paris?"

def chat_call(seed):
    reply = client.chat.completions.create(model=model, max_tokens=200, tool_choice="required",
        messages=[{"role": "user", "content": ask}], extra_body={"seed": seed},
        tools=[{"type": "function", "function": tool}], parallel_tool_calls=False)
    return [json.loads(c.function.arguments) for c in reply.choices[0].message.tool_calls], weather

def responses_call(seed):
    reply = client.responses.create(model=model, input=ask, tools=[{"type": "function", **tool}],
        tool_choice="required", max_output_tokens=200, extra_body={"seed": seed},
        parallel_tool_calls=False)
    return [json.loads(i.arguments) for i in reply.output if i.type == "function_call"], weather

def responses_json(seed):
    reply = client.responses.create(model=model, input="Describe a cat.", max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "animal", "schema": animal,
                         "strict": True}}, extra_body={"seed": seed})
    return [json.loads(reply.output_text)], animal

counts = {}
for case in (chat_call, responses_call, responses_json):
    valid = 0
    for seed in (1, 2, 3):
        try:
            values, schema = case(seed)
            for value in values:
                jsonschema.validate(value, schema)
            valid += bool(values)
        except Exception as error:
            print(f"{case.__name__} seed {seed}: {error!r}", file=sys.stderr)
    counts[case.__name__] = f"{valid}/3"
print(json.dumps(counts))
"""


def tools_smoke(check: Check, folder: Path) -> dict[str, Any]:
    """Tool calls and JSON output with a tool-capable model (a random-weight v7 one) on the GPU,
    through serve's chat completions and Responses API: the grammar masks logits that come from
    device memory, and every call and JSON reply must validate against its schema, seeds 1-3."""
    made = check.run("tools_model", [check.python, "-c", MAKE_TOOLS_MODEL, str(REPO),
                     str(folder / "tools-v7")], timeout=120, vram=False)  # fmt: skip
    path = (made.json() or {}).get("path")
    if not path:
        return {"error": "the tool-capable model was not made: see raw/tools_model.err"}
    check.run("tools_import", check.localmix("import", path, "--name", "tools-v7",
              "--format", "v7"), timeout=60, vram=False)  # fmt: skip
    with serving(check, "tools-v7", "serve_tools.log") as url:
        done = check.run("tools_clients", [check.python, "-c", TOOLS_CLIENTS, url, "tools-v7"],
                         timeout=240)  # fmt: skip
    return done.json() or {"error": "see raw/tools_clients.err"}


# ---- the plan, as JSON (runs in the venv, where localmix is installed) ------------------------


def plan_command(argv: Sequence[str]) -> int:
    """The automatic plan, and the planned GPU MiB of every -ngl and -ncmoe placement."""
    from dataclasses import replace

    from localmix import load

    parser = argparse.ArgumentParser(prog="gpu_check.py plan")
    parser.add_argument("model")
    parser.add_argument("--ctx", type=int, required=True)
    parser.add_argument("--vram-budget")
    parser.add_argument("--ngl", type=int)
    args = parser.parse_args(argv)
    target = load.locate(args.model)
    settings = load.LoadSettings(ctx=args.ctx, vram_budget=args.vram_budget, n_gpu_layers=args.ngl)
    chosen = load.plan_for(target, settings, force=True)
    assert chosen is not None  # forced
    out: dict[str, Any] = {
        "strategy": chosen.strategy, "summary": chosen.summary, "fits": chosen.fits,
        "n_gpu_layers": chosen.n_gpu_layers, "cpu_moe": chosen.cpu_moe,
        "gpu_mib": round(chosen.gpu_bytes / MIB, 1), "gpu_device": chosen.gpu_device,
    }  # fmt: skip
    n_layer = int(target.info.metadata.get(f"{target.info.architecture}.block_count", 0))
    ngl: dict[int, Any] = {}
    ncmoe: dict[int, Any] = {}
    for value in range(n_layer + 2):
        forced = load.plan_for(target, replace(settings, n_gpu_layers=value), force=True)
        ngl[value] = (round(forced.gpu_bytes / MIB, 1), forced.fits) if forced else None
        moe = replace(settings, n_gpu_layers=-1, cpu_moe=value)
        forced = load.plan_for(target, moe, force=True)
        ncmoe[value] = (round(forced.gpu_bytes / MIB, 1), forced.fits) if forced else None
    # the largest plain layer split that fits: the placement people reach for with -ngl
    fitting = [value for value, planned in ngl.items() if planned and planned[1]]
    out["best_layer_split"] = max(fitting, default=0)
    out["planned_ngl"], out["planned_ncmoe"] = ngl, ncmoe
    print(json.dumps(out))
    return 0


# ---- the table --------------------------------------------------------------------------------


def _error(planned: Any, measured: Any) -> str:
    ok = isinstance(planned, int | float) and isinstance(measured, int | float) and measured
    return f"{100 * (planned - measured) / measured:+.1f}%" if ok else "-"


def _ratio(a: Any, b: Any) -> str:
    return (
        f"{a / b:.3f}" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-"
    )


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _median(values: list[Any]) -> Any:
    values = sorted(v for v in values if isinstance(v, int | float))
    return values[len(values) // 2] if values else None


def summary(results: dict[str, Any]) -> str:
    stages = results["stages"]
    env = stages.get("env", {})
    lines = [
        "# localmix GPU check" + (" (CPU rehearsal)" if results.get("rehearse") else ""),
        "",
        f"- GPU: {env.get('gpu')}; threads {env.get('threads')}; nvcc {env.get('nvcc')}",
        "- stages: "
        + ", ".join(
            f"{name} {s.get('seconds', '?')} s{'' if s.get('ok', True) else ' FAILED'}"
            for name, s in stages.items()
        ),
        f"- elapsed {results.get('elapsed_s')} s",
    ]
    check = stages.get("check", {})
    if check:
        exports = check.get("libggml_cuda_exports") or {}
        lines.append(
            f"- crash: CLI with the fix off rc {check.get('cli_fix_off_rc')}, a short script "
            f"with the fix off rc {check.get('cli_fix_script_rc')}, CLI with the fix on rc "
            f"{check.get('cli_fix_on_rc')}; libggml-cuda exports {exports.get('std_symbols', '-')} "
            f"std:: symbols (_M_insert<long>: {exports.get('has_M_insert_long', '-')}, "
            f"codecvt/locale: {exports.get('codecvt_or_locale', '-')}); GPU seen: "
            f"{check.get('gpu_seen')}"
        )
    rule = stages.get("cpu_rule", {})
    if rule:
        forced = rule.get("forced_repack") or {}
        lines.append(
            f"- CPU rule: AMX {rule.get('amx')}; repacking {(rule.get('repack') or {}).get('on')}; "
            f"Q4_K_M CPU decode with localmix's setting rc {(rule.get('default') or {}).get('rc')}, "
            f"with --repack forced rc {forced.get('rc')} (signal {forced.get('signal')})"
        )
    rows = ["| check | localmix | llama.cpp | localmix / llama.cpp |", "|---|---|---|---|"]
    seven = stages.get("7b", {})
    rounds = [v for k, v in seven.items() if re.fullmatch(r"r\d+", k)]
    tests = results.get("tests") or {"pp": "pp512", "tg": "tg128", "chat": "tg256"}
    pp, tg, chat_tg = tests["pp"], tests["tg"], tests["chat"]
    if rounds:
        for test in (pp, tg):
            ours = _median([r["localmix"].get(test, {}).get("avg_ts") for r in rounds])
            ref = _median([r["llama_bench"].get(test, {}).get("avg_ts") for r in rounds])
            rows.append(f"| 7B {test} t/s | {_num(ours)} | {_num(ref)} | {_ratio(ours, ref)} |")
        ref = _median([r["llama_bench"].get(chat_tg, {}).get("avg_ts") for r in rounds])
        for mode in ("greedy", "sampled"):
            ours = _median([r.get(f"chat_{mode}", {}).get("gen_tps") for r in rounds])
            made = _median([r.get(f"chat_{mode}", {}).get("generated_tokens") for r in rounds])
            rows.append(
                f"| 7B `localmix chat` {mode}, {made} tokens, vs {chat_tg} | {_num(ours)} | "
                f"{_num(ref)} | {_ratio(ours, ref)} |"
            )
        planned = (seven.get("plan") or {}).get("gpu_mib")
        measured = _median([r.get("vram_localmix") for r in rounds])
        lb_vram = _median([r.get("vram_llama_bench") for r in rounds])
        rows.append(
            f"| 7B VRAM MiB, planned vs measured (localmix bench; llama-bench {lb_vram}) | "
            f"{_num(planned)} | {_num(measured, 0)} | error {_error(planned, measured)} |"
        )
    mixtral = stages.get("mixtral", {})
    if mixtral.get("auto"):
        auto = mixtral["auto"]
        budget = mixtral.get("budget")
        lm = mixtral.get("localmix_auto", {})
        lm_tg = (lm.get("rows") or {}).get(tg, {}).get("avg_ts")
        lm_pp = (lm.get("rows") or {}).get(pp, {}).get("avg_ts")
        rows.append(
            f"| Mixtral auto plan ({budget}): {auto.get('summary')} | tg {_num(lm_tg)}, pp "
            f"{_num(lm_pp)} | | |"
        )
        rows.append(
            f"| Mixtral auto plan VRAM MiB, planned vs measured | {_num(auto.get('gpu_mib'))} | "
            f"{_num(lm.get('vram'), 0)} | error {_error(auto.get('gpu_mib'), lm.get('vram'))} |"
        )
        limit = _budget_mib(budget)
        best = None
        for row in mixtral.get("sweep", []):
            tg_ts = row["rows"].get(tg, {}).get("avg_ts")
            pp_ts = row["rows"].get(pp, {}).get("avg_ts")
            measured = row["vram"] is not None and limit is not None
            fits = row["vram"] <= limit if measured else bool(row.get("planned_fits"))
            flag = "-ngl 99 -ncmoe" if row["kind"] == "ncmoe" else "-ngl"
            rows.append(
                f"| llama-bench {flag} {row['value']}: tg {_num(tg_ts)}, pp {_num(pp_ts)}; VRAM "
                f"{row['vram']} MiB (planned {row['planned_mib']}){'' if fits else ', over budget'}"
                f" | {_num(lm_tg)} | {_num(tg_ts)} | {_ratio(lm_tg, tg_ts)} |"
            )
            if fits and isinstance(tg_ts, int | float) and (best is None or tg_ts > best[0]):
                best = (tg_ts, f"{flag} {row['value']}")
        if best:
            rows.append(
                f"| **auto plan tg vs the best placement that fits ({best[1]})** | {_num(lm_tg)} "
                f"| {_num(best[0])} | **{_ratio(lm_tg, best[0])}** |"
            )
    rows.extend(_feature_rows(stages.get("features", {})))
    cpu = stages.get("cpu_chat", {})
    cpu_rounds = [v for k, v in cpu.items() if re.fullmatch(r"r\d+", k)]
    if cpu_rounds:
        chat_tg = tests["chat"]
        ref = _median([r["llama_bench"].get(chat_tg, {}).get("avg_ts") for r in cpu_rounds])
        for mode in CHAT_MODES:
            ours = _median([(r.get(mode) or {}).get("gen_tps") for r in cpu_rounds])
            made = _median([(r.get(mode) or {}).get("generated_tokens") for r in cpu_rounds])
            rows.append(
                f"| 125M on the CPU, 1 thread: `localmix chat` {mode.replace('_', ' + ')}, "
                f"{made} tokens, vs {chat_tg} | {_num(ours)} | {_num(ref)} | {_ratio(ours, ref)} |"
            )
    return "\n".join([*lines, "", *rows, ""])


def _feature_rows(features: dict[str, Any]) -> list[str]:
    """imatrix and eval on the GPU against the same command on the CPU; serve on the GPU."""
    rows = []
    same = features.get("imatrix_compare") or {}
    if same:
        rows.append(
            f"| 125M `localmix imatrix -ngl 99` vs `-ngl 0`: {same.get('tensors')} tensors, same "
            f"names {same.get('same_tensors')} | max relative difference "
            f"{same.get('max_rel_diff', float('nan')):.2e} | | |"
        )
    gpu, cpu = features.get("eval_gpu") or {}, features.get("eval_cpu") or {}
    for key in ("ppl", "kld_mean", "same_top"):
        if gpu.get(key) is not None:
            rows.append(
                f"| 125M `localmix eval` {key}, GPU vs CPU | {_num(gpu.get(key), 6)} | "
                f"{_num(cpu.get(key), 6)} | {_ratio(gpu.get(key), cpu.get(key))} |"
            )
    for _, got in sorted((features.get("serve") or {}).items()):
        if got:
            rows.append(
                f"| 125M `localmix serve -ngl 99`, {got.get('clients')} clients: answered "
                f"{got.get('answered')}, aggregate t/s | {_num(got.get('aggregate_tps'))} | | |"
            )
    schema = features.get("schema") or {}
    if schema:
        rows.append(f"| 125M `localmix chat --schema -ngl 99`: replies that validate | "
                    f"{schema.get('valid')}/{schema.get('runs')} | | |")  # fmt: skip
    for case, valid in sorted((features.get("tools") or {}).items()):
        rows.append(f"| random-weight v7 `serve -ngl 99` {case}: valid | {valid} | | |")
    return rows


def _budget_mib(text: Any) -> float | None:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(GiB|MiB)", str(text or ""))
    if not match:
        return None
    return float(match[1]) * (1024 if match[2] == "GiB" else 1)


# ---- main -------------------------------------------------------------------------------------


def rehearsal_budget(check: Check, model: Path, ctx: int) -> str:
    """A budget the tiny Mixtral fits with the experts of half its layers on the CPU, so the
    rehearsal's plan has the same kind of choice to make as a real Mixtral on a 24 GiB card."""
    planned = plan_json(check, model, ctx=ctx, vram_budget="1TiB")["planned_ncmoe"]
    half = planned[str(len(planned) // 2)][0]
    return f"{half + 0.1:.1f}MiB"


def rehearsal_llama_bench(check: Check, given: str | None) -> list[str]:
    if given:
        return [given]
    with contextlib.suppress(Exception):  # no platformdirs, no cache: the stand-in below
        built = cache_dir() / "tools" / "bin" / "llama-bench"
        if built.is_file():
            return [str(built)]
    check.results["llama_bench_stand_in"] = "localmix bench (llama-bench not built here)"
    return []


def run_check(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-"))
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-work-"))
    check = Check(out, work, args.budget, args.rehearse)
    check.say(f"gpu_check: out {out}, work {work}, rehearse {args.rehearse}")
    stage_env(check)
    builder: threading.Thread | None = None
    build_record: dict[str, Any] = {}
    if args.rehearse:
        check.llama_bench = rehearsal_llama_bench(check, args.llama_bench)
        check.threads = min(check.threads, 2)
    else:
        stage_python(check, PREPARED)
        if not check.results["stages"]["python"].get("ok"):
            print(summary(check.results))
            return 1
        check.results["stages"]["build"] = build_record

        def build() -> None:
            start = time.monotonic()
            try:
                build_engine(check, PREPARED, build_record, cuda=not args.cpu_build)
                build_record["ok"] = True
            except Exception as exc:
                build_record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            build_record["seconds"] = round(time.monotonic() - start, 1)
            check.say(f"build done: {build_record}")

        builder = threading.Thread(target=build, daemon=True)
        builder.start()
    models = stage_models(check, "tiny" if args.rehearse or args.cpu_build else "full")
    if builder is not None:
        builder.join(max(1.0, check.left() - 60))
        check.save()
        if not build_record.get("ok"):
            check.say("the build failed or did not finish: stopping")
            print(summary(check.results))
            return 1
    rehearse = args.rehearse or args.cpu_build
    p, n, reps = (32, 8, 1) if rehearse else (512, 128, 3)
    stage_cpu_rule(check, models["125m"])
    stage_check(check, models["7b"])
    stage_7b(check, models["7b"], p, n, reps, rounds=1 if rehearse else 2,
             chat_n=16 if rehearse else 256)  # fmt: skip
    budget = args.vram_budget or (
        rehearsal_budget(check, models["mixtral"], max(p, n)) if rehearse else "24GiB"
    )
    stage_mixtral(check, models["mixtral"], budget, p, n, reps=1 if rehearse else 2,
                  configs_max=2 if rehearse else 6)  # fmt: skip
    stage_features(check, models["125m"])
    stage_cpu_chat(
        check, models["125m"], rounds=1 if rehearse else 3, chat_n=16 if rehearse else 256
    )
    check.save()
    text = summary(check.results)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        return plan_command(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="make .gpu/ here: the pruned sdist and the wheels")
    prep.add_argument("--dest", type=Path, default=PREPARED)
    run = sub.add_parser("run", help="build, install, write the models and measure")
    run.add_argument("--out", help="results folder (default: $OUT, else a new temp folder)")
    run.add_argument("--work", help="scratch folder (default: a new temp folder)")
    run.add_argument("--budget", type=float, default=540, help="seconds for the whole run")
    run.add_argument("--rehearse", action="store_true", help="CPU rehearsal: no build, tiny models")
    run.add_argument("--llama-bench", help="rehearsal: a llama-bench to compare with")
    run.add_argument("--vram-budget", help="the MoE budget (default 24GiB)")
    run.add_argument(
        "--cpu-build", action="store_true", help="rehearse install and build without CUDA"
    )
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.dest)
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())

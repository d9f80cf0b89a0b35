"""The C++ runtime fix for CUDA builds (llama.backend.cxx_runtime_global), pinned on the CPU.

On CUDA builds libggml-cuda.so exports copies of libstdc++ code; when libllama's calls into the
C++ runtime bind to those copies, model loading crashes (llama_model::print_info). localmix makes
libstdc++ global before llama_cpp is first imported, so the real runtime always wins. These tests
pin what that guarantees: the import order, what the global namespace resolves, and that a library
whose own dependency tree offers another copy first still binds to the real runtime.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "localmix"
LINUX = sys.platform.startswith("linux")


def _python(code: str) -> str:
    """Run code in a fresh interpreter (nothing loaded yet) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _imports_llama_cpp(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        if any(name == "llama_cpp" or name.startswith("llama_cpp.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_backend_imports_llama_cpp() -> None:
    """Every path to llama.cpp goes through llama.backend, which fixes the runtime first."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _imports_llama_cpp(ast.parse(path.read_text(), str(path)))
        if lines and path != PACKAGE / "llama" / "backend.py":
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{lines}")
    assert offenders == [], "import llama_cpp through localmix.llama.backend.llama()"


def test_the_scan_sees_every_import_form() -> None:
    """The scan above would catch each way of importing the package."""
    for code in (
        "import llama_cpp",
        "import llama_cpp.llama_cpp as c",
        "from llama_cpp import _ggml",
        "from llama_cpp.llama_cpp import llama_backend_init",
        "def f():\n    import llama_cpp",
    ):
        assert _imports_llama_cpp(ast.parse(code)), code
    assert not _imports_llama_cpp(ast.parse("import llama_cppx\nfrom localmix import llama"))


@pytest.mark.skipif(not LINUX, reason="libstdc++ and dlopen scopes are Linux matters")
def test_llama_cpp_alone_leaves_the_runtime_local() -> None:
    """The control: llama-cpp-python loads libllama RTLD_LOCAL, so without localmix's step the
    global namespace does not know the C++ runtime (and a CUDA build's copies can win)."""
    out = _python(
        """
        from localmix.llama.backend import CXX_CANARY, loaded_from
        import llama_cpp
        print(loaded_from(CXX_CANARY))
        """
    )
    assert out == "None"


@pytest.mark.skipif(not LINUX, reason="libstdc++ and dlopen scopes are Linux matters")
def test_backend_makes_the_runtime_global_before_llama_cpp_loads() -> None:
    out = _python(
        """
        import os
        import sys
        from localmix.llama import backend
        assert "llama_cpp" not in sys.modules
        backend.llama()
        maps = open("/proc/self/maps").read()
        first = {}
        for index, line in enumerate(maps.splitlines()):
            for name in ("libstdc++.so", "libllama.so"):
                if name in line:
                    first.setdefault(name, index)
        resolved = backend.loaded_from(backend.CXX_CANARY)
        print(resolved)
        # both are mapped, and the runtime llama.cpp resolved is the one in this process's map
        # (the map is ordered by address, not by load order: what it proves is which file)
        both = "libstdc++.so" in first and "libllama.so" in first
        print(both, os.path.realpath(resolved) in maps or resolved in maps)
        """
    )
    resolved, mapped = out.splitlines()
    assert Path(resolved).name.startswith("libstdc++.so"), resolved
    assert mapped == "True True"


@pytest.mark.skipif(not LINUX, reason="libstdc++ and dlopen scopes are Linux matters")
def test_the_cli_loads_a_model_with_the_runtime_global(tiny_mistral_gguf_f16: Path) -> None:
    """The path users run: `localmix chat` opens llama.cpp through the door, runtime first."""
    out = _python(
        f"""
        import sys
        from localmix.cli.app import main
        from localmix.llama import backend
        args = ["chat", {str(tiny_mistral_gguf_f16)!r}, "hi", "-n", "2", "--json",
                "--format", "v1", "-t", "1", "--ctx", "256"]
        try:
            main(args)
        except SystemExit as stop:
            assert not stop.code, stop.code
        print("RUNTIME", backend.loaded_from(backend.CXX_CANARY))
        """
    )
    assert '"reply"' in out
    runtime = out.splitlines()[-1].removeprefix("RUNTIME ")
    assert Path(runtime).name.startswith("libstdc++.so"), out


def _compile(tmp: Path) -> Path | None:
    """libuser.so calls std::ostream::operator<<(long); its first dependency, libpoison.so,
    exports a do-nothing std::ostream::_M_insert<long> ahead of libstdc++, as libggml-cuda.so
    exports its copies ahead of libstdc++ in a CUDA build's dependency tree."""
    gcc, gxx = shutil.which("gcc"), shutil.which("g++")
    if not (gcc and gxx):
        return None
    (tmp / "poison.c").write_text(
        "/* std::ostream::_M_insert<long>(long): returns the stream, writes nothing */\n"
        "void *_ZNSo9_M_insertIlEERSoT_(void *self, long value) { (void)value; return self; }\n"
    )
    (tmp / "user.cpp").write_text(
        "#include <sstream>\n"
        'extern "C" int formats_a_long() {\n'
        '    std::ostringstream out; out << 42L; return out.str() == "42";\n'
        "}\n"
    )
    subprocess.run([gcc, "-shared", "-fPIC", "-o", "libpoison.so", "poison.c"], cwd=tmp, check=True)
    subprocess.run(
        # -O2 inlines operator<< so the call is to _M_insert<long> itself, as in libllama;
        # --no-as-needed keeps libpoison first among the dependencies
        [gxx, "-O2", "-shared", "-fPIC", "-o", "libuser.so", "user.cpp", "-Wl,--no-as-needed",
         "-L.", "-lpoison", "-Wl,-rpath,$ORIGIN"],
        cwd=tmp,
        check=True,
    )  # fmt: skip
    return tmp / "libuser.so"


@pytest.mark.skipif(not LINUX, reason="libstdc++ and dlopen scopes are Linux matters")
def test_a_copy_earlier_in_the_dependency_tree_loses_to_the_global_runtime(
    tmp_path: Path,
) -> None:
    library = _compile(tmp_path)
    if library is None:
        pytest.skip("needs gcc and g++")
    load = f"""
        import ctypes
        user = ctypes.CDLL({str(library)!r})  # RTLD_LOCAL, as llama-cpp-python loads libllama
        print(user.formats_a_long())
        """
    # Without the step, the copy in the library's own tree wins: the crash class, reproduced.
    assert _python(load) == "0"
    fixed = "from localmix.llama.backend import cxx_runtime_global\ncxx_runtime_global()\n"
    assert _python(fixed + textwrap.dedent(load)) == "1"

"""`localmix quantize --imatrix` against `llama-quantize --imatrix`, byte for byte.

A synthetic "small" Mistral and Mixtral (dims of 256, so the 256-wide i-quant blocks apply) are
converted to f16, given an importance matrix in each of llama-imatrix's formats (GGUF and the
legacy .dat, tests/imatrix_files.py), and quantized by both tools from the same llama.cpp source
(llamacpp_tools.py) to the types that need one, and to Q4_K_M, which uses one when given.

    python benchmarks/imatrix_vs_llama_quantize.py
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.imatrix_files

from llamacpp_tools import tool

from tests.imatrix_files import write_gguf_imatrix, write_legacy_imatrix

TYPES = ("IQ2_XS", "IQ1_S", "Q2_K_S", "IQ3_XXS", "Q4_K_M")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    from localmix.build.convert import convert
    from localmix.build.quantize import quantize
    from localmix.build.synth import checkpoints as synth

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in ("mistral", "mixtral"):
            ckpt = synth.checkpoint(work / f"{arch}-ckpt", arch=arch, size="small")
            f16 = convert(ckpt, work / f"{arch}-f16.gguf", outtype="f16")
            matrices = {
                "gguf": write_gguf_imatrix(f16, work / f"{arch}-imatrix.gguf"),
                "dat": write_legacy_imatrix(f16, work / f"{arch}-imatrix.dat"),
            }
            for fmt, matrix in matrices.items():
                for qtype in TYPES:
                    ours = quantize(
                        f16, work / f"{arch}-{fmt}-{qtype}.ours.gguf", qtype, imatrix=matrix
                    )
                    ref = work / f"{arch}-{fmt}-{qtype}.ref.gguf"
                    cmd = [
                        str(tool("llama-quantize")),
                        "--imatrix",
                        str(matrix),
                        str(f16),
                        str(ref),
                        qtype,
                    ]
                    subprocess.run(cmd, check=True, capture_output=True)
                    same = digest(ours) == digest(ref)
                    failures += not same
                    verdict = "identical" if same else "DIFFERENT"
                    print(
                        f"{arch:<8} {fmt:<5} {qtype:<8} {ours.stat().st_size:>10} bytes  {verdict}"
                    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/gpu_check.py: its CPU rehearsal runs every stage end to end, so the one-call GPU
check cannot rot between the rare sessions that have a GPU; its table says what the numbers say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _gpu_check():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check

        return gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "run", "--rehearse",
         "--out", str(out), "--work", str(work), "--budget", "400"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == [
        "env",
        "models",
        "cpu_rule",
        "check",
        "7b",
        "mixtral",
        "features",
        "cpu_chat",
    ]
    assert all(stage["ok"] for stage in stages.values()), stages
    failed = {name: run["rc"] for name, run in results["runs"].items() if run["rc"] != 0}
    # forcing repacking is the one run allowed to die: on an AMX host it is the evidence
    failed.pop("cpu_rule_chat_forced_repack", None)
    assert failed == {}
    assert stages["cpu_rule"]["default"]["rc"] == 0
    # the crash diagnosis ran the CLI with the runtime fix off and on, under the loader's log
    assert [stages["check"][f"cli_fix_{mode}_rc"] for mode in ("off", "script", "on")] == [0] * 3
    assert any("libllama" in line for line in stages["check"]["bindings_fix_on"])
    # the plan had to put experts on the CPU under the rehearsal's budget
    auto = stages["mixtral"]["auto"]
    assert auto["strategy"] == "cpu-moe" and auto["cpu_moe"] > 0
    assert [row["kind"] for row in stages["mixtral"]["sweep"]] == ["ncmoe", "ngl"]
    # tool calls and JSON replies through serve (chat completions and Responses) all validate
    tools = stages["features"]["tools"]
    assert set(tools) == {"chat_call", "responses_call", "responses_json"}
    assert set(tools.values()) == {"3/3"}, tools
    table = (out / "summary.md").read_text()
    assert "7B pp32 t/s" in table and "`localmix chat` greedy" in table
    assert "auto plan tg vs the best placement that fits" in table
    assert "125M on the CPU, 1 thread: `localmix chat` greedy + penalty" in table
    assert "random-weight v7 `serve -ngl 99` responses_json: valid | 3/3" in table
    assert table.strip() in done.stdout


def test_the_table_reads_a_gpu_run() -> None:
    """A GPU run's records: ratios, VRAM errors, over-budget rows and the MoE headline."""
    gpu_check = _gpu_check()
    row = {"pp512": {"avg_ts": 9000.0}, "tg128": {"avg_ts": 280.0}, "tg256": {"avg_ts": 270.0}}
    ours = {"pp512": {"avg_ts": 9450.0}, "tg128": {"avg_ts": 266.0}}
    chat = {"gen_tps": 256.5, "generated_tokens": 256}
    results = {
        "rehearse": False,
        "tests": {"pp": "pp512", "tg": "tg128", "chat": "tg256"},
        "stages": {
            "env": {"gpu": "NVIDIA H200", "threads": 16, "ok": True, "seconds": 1},
            "7b": {
                "ok": True,
                "plan": {"gpu_mib": 4787.0},
                "r1": {
                    "llama_bench": row,
                    "localmix": ours,
                    "vram_localmix": 4877,
                    "vram_llama_bench": 4870,
                    "chat_greedy": chat,
                    "chat_sampled": chat,
                },
            },
            "mixtral": {
                "ok": True,
                "budget": "24GiB",
                "auto": {"summary": "experts of layers 0-4 on the CPU", "gpu_mib": 23993.0},
                "localmix_auto": {"rows": {"tg128": {"avg_ts": 52.0}}, "vram": 24057},
                "sweep": [
                    {
                        "kind": "ncmoe",
                        "value": 5,
                        "rows": {"tg128": {"avg_ts": 51.0}},
                        "vram": 24057,
                        "planned_mib": 23993.0,
                        "planned_fits": True,
                    },
                    {
                        "kind": "ncmoe",
                        "value": 4,
                        "rows": {"tg128": {"avg_ts": 55.0}},
                        "vram": 25100,
                        "planned_mib": 24900.0,
                        "planned_fits": False,
                    },
                    {
                        "kind": "ngl",
                        "value": 28,
                        "rows": {"tg128": {"avg_ts": 49.0}},
                        "vram": 23925,
                        "planned_mib": 23835.0,
                        "planned_fits": True,
                    },
                ],
            },
        },
    }
    table = gpu_check.summary(results)
    assert "| 7B pp512 t/s | 9450.0 | 9000.0 | 1.050 |" in table
    assert "| 7B tg128 t/s | 266.0 | 280.0 | 0.950 |" in table
    assert "greedy, 256 tokens, vs tg256 | 256.5 | 270.0 | 0.950 |" in table
    assert "| 4787.0 | 4877 | error -1.8% |" in table
    assert "error -0.3%" in table  # Mixtral: 23993 planned, 24057 measured
    assert "-ncmoe 4: tg 55.0, pp -; VRAM 25100 MiB (planned 24900.0), over budget" in table
    # the fastest placement that fits is -ncmoe 5 (51.0), not the faster one over budget
    assert "the best placement that fits (-ngl 99 -ncmoe 5)** | 52.0 | 51.0 | **1.020** |" in table

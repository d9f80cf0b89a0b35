"""localmix bench: llama-bench's tests, fields and formats; the plot; history and --compare."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from localmix.bench import history, report
from localmix.bench.params import BenchParams, cases, parse_ints, parse_pairs, parse_words
from localmix.bench.result import FIELDS, BenchResult
from localmix.errors import UsageError
from tests.cli_run import run_cli

LLAMA_BENCH_JSON_KEYS = [*FIELDS, "samples_ns", "samples_ts"]


def made_result(**changes: object) -> BenchResult:
    """A result record as the runner makes one (values chosen, not measured)."""
    base = BenchResult(
        model_filename="/models/tiny.gguf",
        model_type="llama ?B F16",
        model_size=1_000_000,
        model_n_params=500_000,
        n_batch=2048,
        n_ubatch=512,
        n_threads=2,
        type_k="f16",
        type_v="f16",
        n_gpu_layers=-1,
        flash_attn="auto",
        n_prompt=0,
        n_gen=128,
        n_depth=0,
        test_time="2025-01-01T00:00:00Z",
        samples_ns=(1_000_000_000, 1_010_000_000, 990_000_000),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# --- the sweep --------------------------------------------------------------------------------


def test_bench_sweep_expands_in_llama_bench_order() -> None:
    params = BenchParams(n_prompt=(16,), n_gen=(4,), n_pg=((8, 2),), n_threads=(1, 2))
    found = cases([Path("a.gguf"), Path("b.gguf")], params)
    assert [(c.model.name, c.n_threads, c.test) for c in found] == [
        (m, t, test)
        for m in ("a.gguf", "b.gguf")
        for t in (1, 2)
        for test in ("pp16", "tg4", "pp8+tg2")
    ]
    assert found[0].n_ctx == 16 and found[2].n_ctx == 10


def test_bench_depth_names_tests_like_llama_bench() -> None:
    found = cases([Path("m.gguf")], BenchParams(n_prompt=(512,), n_gen=(0,), n_depth=(0, 4096)))
    assert [c.test for c in found] == ["pp512", "pp512 @ d4096"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512", (512,)), ("1,2,4", (1, 2, 4)), ("1-8+2", (1, 3, 5, 7)), ("1-16*2", (1, 2, 4, 8, 16))],
)
def test_bench_parses_lists_and_ranges_like_llama_bench(text: str, expected: tuple[int]) -> None:
    assert parse_ints([text], name="-t") == expected


@pytest.mark.parametrize("text", ["x", "1,,2", "-1", "4-8*1"])
def test_bench_rejects_bad_numbers_with_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ints([text], name="-t")


def test_bench_reads_pg_pairs_and_fa_words() -> None:
    assert parse_pairs(["512,128", "64,16"]) == ((512, 128), (64, 16))
    assert parse_words(["on,0", "auto"], name="-fa") == ("on", "off", "auto")
    assert parse_ints(["-1,0"], name="-ngl", allow_negative=True) == (-1, 0)
    with pytest.raises(UsageError):
        BenchParams(type_k=("q3_k",))


# --- the record and llama-bench's formats -------------------------------------------------------


def test_bench_result_statistics_are_llama_bench_s() -> None:
    result = made_result(n_gen=100, samples_ns=(1_000_000_000, 2_000_000_000))
    assert result.samples_ts == (100.0, 50.0)
    assert result.avg_ts == 75.0
    assert result.stddev_ts == pytest.approx(35.35534, rel=1e-6)  # sample stdev (n - 1)
    assert result.avg_ns == 1_500_000_000
    assert result.test == "tg100"


def test_bench_json_round_trips_a_result() -> None:
    result = made_result(flash_attn="on", n_depth=64)
    again = BenchResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again == result
    assert result.to_json()["flash_attn"] == 1


def check_llama_bench_formats(results: list[BenchResult]) -> None:
    """CSV, JSON and JSONL parse with the standard readers and carry llama-bench's names."""
    rows = list(csv.DictReader(io.StringIO(report.to_csv(results))))
    assert list(rows[0].keys()) == list(FIELDS)
    assert [float(r["avg_ts"]) for r in rows] == pytest.approx([r.avg_ts for r in results])
    assert rows[0]["cpu_strict"] in ("0", "1")
    objects = json.loads(report.to_json(results))
    assert [list(o.keys()) for o in objects] == [LLAMA_BENCH_JSON_KEYS] * len(results)
    for obj, result in zip(objects, results, strict=True):
        assert obj["n_prompt"] == result.n_prompt and obj["n_gen"] == result.n_gen
        assert obj["samples_ns"] == list(result.samples_ns)
        assert obj["avg_ts"] == pytest.approx(result.avg_ts, rel=1e-6)
        assert isinstance(obj["no_kv_offload"], bool) and isinstance(obj["model_size"], int)
    lines = report.to_jsonl(results).splitlines()
    assert [list(json.loads(line).keys()) for line in lines] == [LLAMA_BENCH_JSON_KEYS] * len(
        results
    )
    markdown = report.to_markdown(results).splitlines()
    assert markdown[0].startswith("| model ") and "t/s" in markdown[0]
    assert markdown[1].startswith("| ---")


def test_bench_formats_carry_llama_bench_fields_on_made_results() -> None:
    check_llama_bench_formats(
        [made_result(n_prompt=512, n_gen=0), made_result(model_type='a "quoted", name')]
    )


def test_bench_plot_renders_plain_text() -> None:
    results = [
        made_result(n_threads=1, samples_ns=(2_000_000_000, 2_100_000_000)),
        made_result(n_threads=2),
        made_result(n_prompt=512, n_gen=0, n_threads=1),
        made_result(n_prompt=512, n_gen=0, n_threads=2),
    ]
    text = report.plot(results, width=20)
    assert "\x1b" not in text
    assert "tg128 · t/s by threads" in text and "pp512 · t/s by threads" in text
    tg_lines = [line for line in text.splitlines() if "threads=" in line][:2]
    assert tg_lines[1].count("█") == 20 and 9 <= tg_lines[0].count("█") <= 10


def test_bench_table_and_plot_name_each_model_when_several_are_measured() -> None:
    from rich.console import Console

    a = made_result(model_filename="/cache/blobs/abc123")
    b = made_result(model_filename="/models/other.Q8_0.gguf")
    names = {"/cache/blobs/abc123": "org--a-gguf:Q4_K_M"}
    console = Console(width=200, color_system=None)
    with console.capture() as captured:
        console.print(report.table([a, b], names=names))
    rows = captured.get().splitlines()
    assert rows[0].split()[0] == "name"
    assert "org--a-gguf:Q4_K_M" in rows[1] and "other.Q8_0.gguf" in rows[2]
    text = report.plot([a, b], names=names)
    assert "org--a-gguf:Q4_K_M · llama ?B F16" in text and "other.Q8_0.gguf · llama" in text
    with console.capture() as captured:  # one model: no name column, as llama-bench
        console.print(report.table([a]))
    assert "name" not in captured.get().splitlines()[0]


def test_bench_flags_a_result_whose_repetitions_spread_wide() -> None:
    steady = made_result()
    noisy = made_result(samples_ns=(500_000_000, 1_000_000_000, 2_000_000_000))
    assert not steady.noisy and noisy.noisy
    assert report.result_ts_text(noisy).endswith("noisy")
    assert not report.result_ts_text(steady).endswith("noisy")


def test_bench_roofline_cell_carries_its_unit() -> None:
    from rich.console import Console

    from localmix.bench.roofline import Roofline

    roof = Roofline(bytes_per_token=1, bandwidth_gbs=1.0, ceiling_ts=123.4, share=0.5)
    console = Console(width=200, color_system=None)
    with console.capture() as captured:
        console.print(report.table([made_result()], [roof]))
    assert "50% of 123.4 t/s" in captured.get()


# --- history and --compare ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new_ns", "flagged"),
    [
        ((1_000_000_000, 1_010_000_000, 990_000_000), False),  # a rerun
        ((1_020_000_000, 1_030_000_000, 1_010_000_000), False),  # 2 % slower: inside the floor
        ((1_500_000_000, 1_490_000_000, 1_510_000_000), True),  # a third slower
        ((800_000_000, 810_000_000, 790_000_000), True),  # faster
    ],
)
def test_bench_compare_flags_only_changes_outside_the_noise(
    new_ns: tuple[int, ...], flagged: bool
) -> None:
    earlier = [made_result(), made_result()]
    (found,) = history.compare([made_result(samples_ns=new_ns)], earlier)
    assert found.n_baseline == 2
    assert found.flagged is flagged


def test_bench_compare_widens_the_threshold_for_noisy_runs() -> None:
    noisy = (600_000_000, 1_000_000_000, 1_400_000_000)
    (found,) = history.compare(
        [made_result(samples_ns=(1_150_000_000,) * 3)], [made_result(samples_ns=noisy)]
    )
    assert not found.flagged and found.threshold_pct > 10


def test_bench_compare_says_within_noise_for_a_big_change_with_a_big_spread() -> None:
    noisy = (300_000_000, 1_000_000_000, 1_700_000_000)
    (found,) = history.compare(
        [made_result(samples_ns=(2_000_000_000,) * 3)], [made_result(samples_ns=noisy)]
    )
    assert found.delta_pct < -40 and not found.flagged
    assert found.verdict == "within noise"
    (rerun,) = history.compare([made_result()], [made_result()])
    assert rerun.verdict == "same"


def test_bench_compare_separates_tests_and_names_changed_threads() -> None:
    earlier = [made_result(n_threads=2)]
    (other_test,) = history.compare([made_result(n_gen=64)], earlier)
    assert other_test.n_baseline == 0 and other_test.verdict == "new"
    slower = made_result(n_threads=1, samples_ns=(1_900_000_000,) * 3)
    (found,) = history.compare([slower], earlier)
    assert found.flagged and found.verdict == "slower"
    assert found.changed == ("n_threads 2→1",)


def test_bench_history_appends_and_loads(localmix_home: Path) -> None:
    first, second = made_result(), made_result(n_threads=1)
    path = history.append([first])
    history.append([second])
    assert path.parent.parent == localmix_home
    path.open("a").write('{"truncated": \n')  # a line cut short must not hide the rest
    assert history.load() == [first, second]


# --- on a real GGUF through the real engine ------------------------------------------------------


@pytest.fixture(scope="session")
def bench_gguf(tiny_mistral_gguf_f16: Path) -> Path:
    return tiny_mistral_gguf_f16


@pytest.fixture(scope="session")
def measured(bench_gguf: Path) -> tuple[list[BenchResult], list[str]]:
    from localmix.bench.run import run

    params = BenchParams(
        n_prompt=(16,), n_gen=(4,), n_pg=((8, 2),), n_depth=(0, 8), repetitions=3, n_threads=(1,)
    )
    stages: list[str] = []
    results = run([bench_gguf], params, progress=lambda event: stages.append(event.stage))
    return results, stages


@pytest.mark.slow
def test_bench_runs_pp_tg_and_pg_with_llama_bench_fields(
    bench_gguf: Path, measured: tuple[list[BenchResult], list[str]]
) -> None:
    results, stages = measured
    assert [r.test for r in results] == [
        "pp16", "tg4", "pp8+tg2", "pp16 @ d8", "tg4 @ d8", "pp8+tg2 @ d8",
    ]  # fmt: skip
    for r in results:
        assert r.model_filename == str(bench_gguf)
        assert r.model_type and r.model_size > 0 and r.model_n_params > 0
        assert len(r.samples_ns) == 3 and len(r.samples_ts) == 3 and r.avg_ts > 0
        assert (r.n_threads, r.n_batch, r.n_ubatch, r.type_k, r.flash_attn) == (
            1, 2048, 512, "f16", "auto",
        )  # fmt: skip
        assert r.backends and r.test_time.endswith("Z")
    assert stages[0] == "load" and stages.count("done") == 6
    assert {"warmup", "depth", "run"} <= set(stages)
    check_llama_bench_formats(results)


@pytest.mark.slow
def test_bench_compare_flags_a_slowdown_not_a_rerun_on_real_records(bench_gguf: Path) -> None:
    from localmix.bench.run import run

    # tg64 x 5: samples of ~10 ms, long enough that a preempted one does not drown the signal.
    params = BenchParams(n_prompt=(0,), n_gen=(64,), repetitions=5, n_threads=(1,))
    earlier = [replace(r, n_threads=2) for r in run([bench_gguf], params)]
    rerun = [replace(r, samples_ns=tuple(reversed(r.samples_ns))) for r in earlier]
    assert not any(c.flagged for c in history.compare(rerun, earlier))
    # One thread instead of two, at half the speed: flagged, and the change is named.
    fewer = [
        replace(r, n_threads=1, samples_ns=tuple(2 * ns for ns in r.samples_ns)) for r in earlier
    ]
    (found,) = history.compare(fewer, earlier)
    assert found.flagged and found.verdict == "slower" and found.delta_pct == pytest.approx(-50)
    assert found.changed == ("n_threads 2→1",)


@pytest.mark.slow
def test_bench_cli_prints_csv_and_json_that_parse(
    capsys: pytest.CaptureFixture[str], bench_gguf: Path
) -> None:
    args = ("bench", str(bench_gguf), "-p", "16", "-n", "4", "-r", "2", "-t", "1")
    done = run_cli(capsys, *args, "-o", "csv")
    assert done.code == 0, done.err
    rows = list(csv.DictReader(io.StringIO(done.out)))
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [("16", "0"), ("0", "4")]
    assert list(rows[0]) == list(FIELDS)
    done = run_cli(capsys, *args, "-o", "json")
    assert done.code == 0, done.err
    assert [list(o) for o in json.loads(done.out)] == [LLAMA_BENCH_JSON_KEYS] * 2
    assert len(history.load()) == 4  # both runs recorded


@pytest.mark.slow
def test_bench_cli_plots_and_compares_in_a_plain_terminal(
    capsys: pytest.CaptureFixture[str], bench_gguf: Path
) -> None:
    args = ("bench", str(bench_gguf), "-p", "16", "-n", "4", "-r", "2", "-t", "1", "-d", "0,8")
    first = run_cli(capsys, *args, "--plot", "--compare")
    assert first.code == 0, first.err
    assert "\x1b" not in first.out
    assert "tg4 · t/s by depth" in first.out and "depth=8 │" in first.out
    assert "roofline" in first.out and "new" in first.out
    second = run_cli(capsys, *args, "--compare")
    assert second.code == 0, second.err
    assert "delta" in second.out and "%" in second.out


@pytest.mark.slow
def test_bench_chat_measures_time_to_first_token(
    capsys: pytest.CaptureFixture[str], bench_gguf: Path
) -> None:
    from localmix.bench.chat import run_chat

    (result,) = run_chat([bench_gguf], BenchParams(repetitions=2, n_threads=(1,)), max_tokens=4)
    assert result.n_prompt > 0 and result.samples_n_gen == (4, 4)
    assert all(t > 0 for t in result.samples_ttft_s) and result.avg_ts > 0
    done = run_cli(capsys, "bench", str(bench_gguf), "--chat", "-r", "1", "-n", "4", "-t", "1")
    assert done.code == 0, done.err
    assert "TTFT" in done.out


@pytest.mark.slow
def test_bench_roofline_counts_only_active_experts(tiny_mixtral_gguf_f32: Path) -> None:
    from localmix.bench import roofline
    from localmix.gguffile import inspect

    info = inspect(tiny_mixtral_gguf_f32)
    n_used, n_expert = info.key("expert_used_count"), info.expert_count
    experts = sum(t.n_bytes for t in info.tensors if "_exps." in t.name)
    dense = sum(t.n_bytes for t in info.tensors if "_exps." not in t.name)
    if "output.weight" in {t.name for t in info.tensors}:
        dense -= next(t.n_bytes for t in info.tensors if t.name == "token_embd.weight")
    traffic = roofline.traffic(tiny_mixtral_gguf_f32)
    assert 0 < n_used < n_expert and experts > 0
    assert traffic.weight_bytes == int(dense + experts * n_used / n_expert)
    tg = made_result(model_filename=str(tiny_mixtral_gguf_f32), n_gen=128, backends="CPU")
    roof = roofline.roofline(tg, bandwidth=10.0)
    assert roof is not None
    assert roof.ceiling_ts == pytest.approx(10e9 / roof.bytes_per_token)
    assert roof.bytes_per_token > traffic.weight_bytes  # plus the KV cache it reads
    assert roofline.roofline(made_result(n_prompt=512, n_gen=0), bandwidth=10.0) is None


@pytest.mark.slow
def test_bench_a_combination_llama_cpp_refuses_is_an_error_row_and_the_sweep_goes_on(
    capsys: pytest.CaptureFixture[str], bench_gguf: Path
) -> None:
    # The tiny model's 16-wide heads do not divide into q8_0's 32-blocks: llama.cpp refuses
    # that K cache, as it refuses a quantized V cache without flash attention on real models.
    args = ("bench", str(bench_gguf), "-p", "16", "-n", "0", "-r", "1", "-t", "1")
    done = run_cli(capsys, *args, "-ctk", "q8_0,f16")
    assert done.code == 13
    rows = [line for line in done.out.splitlines() if "pp16" in line]
    assert len(rows) == 2 and "error" in rows[0] and "±" in rows[1]
    assert "q8_0" in done.err and "refused 1 of 2 tests" in done.err
    as_json = run_cli(capsys, *args, "-ctk", "q8_0,f16", "-o", "json")
    assert [o["type_k"] for o in json.loads(as_json.out)] == ["f16"]  # measured rows only
    assert len(history.load()) == 2  # error rows are not history


@pytest.mark.parametrize(
    ("args", "code"),
    [(("no-such-model",), 3), (("missing.gguf",), 3), (("x.gguf", "-o", "xml"), 2)],
)
def test_bench_cli_explains_bad_input(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], code: int
) -> None:
    done = run_cli(capsys, "bench", *args)
    assert done.code == code
    assert done.err.startswith("error:")

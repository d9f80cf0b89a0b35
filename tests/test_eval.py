"""localmix eval: llama-perplexity --kl-divergence's statistics over llama-perplexity's chunks, in
lockstep with no base-logits file; the store's reference; the table of quants; the errors.

Equality with the real llama-perplexity runs here when the tool is already built (the benchmarks'
cache), and always in benchmarks/eval_vs_llama_perplexity.py."""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from localmix import load
from localmix.corpus import Text
from localmix.errors import ReferenceNotFound, TextTooShort, UsageError, VocabularyMismatch
from localmix.quality.evaluate import EvalSettings, chunks, evaluate
from localmix.quality.stats import KLD_FLOOR, Tally
from tests import llamacpp_reference
from tests.cli_run import run_cli

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
QUICK = EvalSettings(max_chunks=2, threads=1)


@pytest.fixture(scope="module")
def tiny_q4(tiny_mistral_gguf_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from localmix.build.quantize import quantize

    return quantize(tiny_mistral_gguf_f16, tmp_path_factory.mktemp("q4") / "q4.gguf", "Q4_K_M")


# ---- the statistics ----------------------------------------------------------------------------


def _direct(reference: np.ndarray, model: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The same numbers the plain way: float64 log-softmax per row, numpy's percentiles."""
    ref = reference.astype(np.float64)
    mod = model.astype(np.float64)
    log_ref = ref - np.log(np.exp(ref - ref.max(1, keepdims=True)).sum(1, keepdims=True))
    log_ref -= ref.max(1, keepdims=True)
    log_mod = mod - np.log(np.exp(mod - mod.max(1, keepdims=True)).sum(1, keepdims=True))
    log_mod -= mod.max(1, keepdims=True)
    rows = np.arange(len(targets))
    nll, nll_ref = -log_mod[rows, targets], -log_ref[rows, targets]
    kept = log_ref > KLD_FLOOR
    kld = (np.exp(log_ref) * (log_ref - log_mod) * kept).sum(1)
    dp = np.exp(-nll) - np.exp(-nll_ref)
    return {
        "ppl": math.exp(nll.mean()),
        "ppl_ref": math.exp(nll_ref.mean()),
        "kld_mean": kld.mean(),
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_p999": float(np.percentile(kld, 99.9)),
        "kld_max": kld.max(),
        "same_top": float((ref.argmax(1) == mod.argmax(1)).mean()),
        "dp_rms": math.sqrt((dp * dp).mean()),
    }


@pytest.mark.parametrize("n_vocab", [1000, 131072])
def test_scores_equal_the_plain_computation(n_vocab: int) -> None:
    """Block by block in float32 with double sums = one float64 pass; and rows added in two
    calls give the same scores as in one."""
    rng = np.random.default_rng(n_vocab)
    rows = 300 if n_vocab < 10000 else 24
    reference = (4 * rng.standard_normal((rows, n_vocab))).astype(np.float32)
    reference[:, :5] -= 40  # some tokens below llama.cpp's -16 floor
    model = reference + (0.3 * rng.standard_normal(reference.shape)).astype(np.float32)
    targets = rng.integers(0, n_vocab, rows)
    one, two = Tally(), Tally()
    one.add(reference, model, targets)
    two.add(reference[:7], model[:7], targets[:7])
    two.add(reference[7:], model[7:], targets[7:])
    scores = one.scores()
    assert asdict(two.scores()) == pytest.approx(asdict(scores), rel=1e-12)  # sums' order
    for key, value in _direct(reference, model, targets).items():
        assert getattr(scores, key) == pytest.approx(value, rel=1e-5), key
    assert scores.n_tokens == rows
    assert scores.ppl_ratio == pytest.approx(scores.ppl / scores.ppl_ref)


def test_identical_logits_cost_nothing() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((50, 300)).astype(np.float32)
    tally = Tally()
    tally.add(logits, logits.copy(), rng.integers(0, 300, 50))
    scores = tally.scores()
    assert scores.kld_mean == scores.kld_max == 0.0
    assert scores.same_top == 1.0 and scores.ppl_ratio == 1.0 and scores.dp_rms == 0.0


def test_chunks_are_llama_perplexity_chunks() -> None:
    """n_ctx tokens each, BOS first, targets after the first half, the leftover unscored."""
    tokens = list(range(100, 100 + 2 * 8 + 5))
    cut = list(chunks(tokens, 8, bos=1))
    assert cut == [
        ([1, 101, 102, 103, 104, 105, 106, 107], [105, 106, 107]),
        ([1, 109, 110, 111, 112, 113, 114, 115], [113, 114, 115]),
    ]
    assert [c for c, _ in chunks(tokens, 8, bos=None, limit=1)] == [tokens[:8]]


# ---- the engine's rows ---------------------------------------------------------------------------


def test_logits_from_a_position_and_as_a_view(tiny_mistral_gguf_f16: Path) -> None:
    settings = load.LoadSettings(ctx=512, threads=1)
    with load.open_model(tiny_mistral_gguf_f16, settings) as loaded:
        engine = loaded.engine
        tokens = engine.tokenize("The quick brown fox " * 40, add_bos=True)[:300]
        every = engine.logits(tokens)
        half = engine.logits(tokens, 150)
        view = engine.logits(tokens, 150, view=True)
        assert np.array_equal(every[150:], half) and np.array_equal(half, view)
        assert not view.flags.writeable and half.flags.writeable
        with pytest.raises(UsageError):
            engine.logits(tokens, 300)


# ---- evaluate: lockstep over a text --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_a_copy_of_the_model_costs_nothing(
    arch: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    original: Path = request.getfixturevalue(f"tiny_{arch}_gguf_f16")
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(original, copy)
    result = evaluate(copy, original, settings=QUICK)
    s = result.scores
    assert s.kld_mean == 0.0 and s.kld_max == 0.0 and s.same_top == 1.0 and s.dp_rms == 0.0
    assert s.ppl == s.ppl_ref and s.n_tokens == 2 * 255


def test_reference_perplexity_is_that_of_the_scored_half(
    tiny_mistral_gguf_f16: Path, tiny_q4: Path
) -> None:
    """PPL(reference) = exp(mean NLL) over each chunk's second half, computed here from whole
    chunks' logits; the quant loses something, and the percentiles are in order."""
    settings = EvalSettings(n_ctx=256, max_chunks=3, threads=1)
    text = Text("t", "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 400, "test")
    result = evaluate(tiny_q4, tiny_mistral_gguf_f16, text, settings)
    with load.open_model(tiny_mistral_gguf_f16, settings.load_settings()) as loaded:
        engine = loaded.engine
        tokens = engine.tokenize(text.text, add_bos=True, special=False)
        nll: list[float] = []
        for index in range(3):
            chunk = [engine.bos_id, *tokens[index * 256 + 1 : (index + 1) * 256]]
            logits = engine.logits(chunk).astype(np.float64)
            for position in range(128, 255):
                row = logits[position]
                top = row.max()
                nll.append(top + math.log(np.exp(row - top).sum()) - row[chunk[position + 1]])
    s = result.scores
    assert s.n_tokens == len(nll) == 3 * 127
    assert s.ppl_ref == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert s.kld_mean > 0 and 0 < s.same_top < 1 and s.ppl != s.ppl_ref
    assert s.kld_min <= s.kld_median <= s.kld_p99 <= s.kld_p999 <= s.kld_max
    assert result.n_chunks == 3 and result.n_ctx == 256 and result.n_vocab == 32000


@pytest.mark.slow
def test_equal_to_llama_perplexity(tiny_mixtral_gguf_f16: Path, tmp_path: Path) -> None:
    """The real tool on a tiny Mixtral, Q4_K_M against F16, 2 chunks: PPL to 4 significant
    digits, mean KLD and same top within 1% (the full comparison: the benchmark script)."""
    from localmix.build.quantize import quantize

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import eval_vs_llama_perplexity as bench
    finally:
        sys.path.pop(0)
    q4 = quantize(tiny_mixtral_gguf_f16, tmp_path / "q4.gguf", "Q4_K_M")
    llamacpp_reference.tool("llama-perplexity")  # built here on a fresh machine
    theirs = bench.llama_kld(tiny_mixtral_gguf_f16, q4, tmp_path, chunks=2, threads=1)
    ours = evaluate(q4, tiny_mixtral_gguf_f16, settings=QUICK).scores
    assert ours.ppl == pytest.approx(theirs.values["ppl"], rel=1e-4)
    assert ours.ppl_ref == pytest.approx(theirs.base_ppl, rel=1e-4)
    assert ours.kld_mean == pytest.approx(theirs.values["kld_mean"], rel=0.01)
    assert ours.same_top == pytest.approx(theirs.values["same_top"], rel=0.01)
    assert theirs.base_file == bench.base_logits_bytes(32000, 2)


# ---- the store's reference and the errors ----------------------------------------------------


def _import(capsys: pytest.CaptureFixture[str], path: Path, name: str = "tiny") -> None:
    result = run_cli(capsys, "import", str(path), "--name", name)
    assert result.code == 0, result.err


def test_the_store_reference_is_the_most_precise_file(
    tiny_mistral_gguf_f16: Path, tiny_q4: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _import(capsys, tiny_q4)
    with pytest.raises(ReferenceNotFound) as missing:
        evaluate("tiny", settings=QUICK)
    assert "--keep-source" in (missing.value.hint or "") and "--against" in missing.value.hint
    _import(capsys, tiny_mistral_gguf_f16)
    result = evaluate("tiny", settings=QUICK)  # the store's preferred quant, Q4_K_M
    assert (result.model, result.reference) == ("tiny:Q4_K_M", "tiny:F16")
    with pytest.raises(ReferenceNotFound, match="already the most precise"):
        evaluate("tiny:F16", settings=QUICK)


def test_a_file_needs_a_reference_and_not_itself(tiny_mistral_gguf_f16: Path) -> None:
    with pytest.raises(ReferenceNotFound) as no_reference:
        evaluate(tiny_mistral_gguf_f16, settings=QUICK)
    assert "--against" in (no_reference.value.hint or "")
    with pytest.raises(UsageError, match="with itself"):
        evaluate(tiny_mistral_gguf_f16, tiny_mistral_gguf_f16, settings=QUICK)


def test_a_text_shorter_than_one_chunk(tiny_mistral_gguf_f16: Path, tiny_q4: Path) -> None:
    text = Text("short", "Only a few words.", "test")
    with pytest.raises(TextTooShort) as short:
        evaluate(tiny_q4, tiny_mistral_gguf_f16, text, QUICK)
    assert "tokens" in short.value.message and short.value.hint


def test_models_of_different_vocabularies_are_refused(
    tiny_mistral_gguf_f16: Path, tmp_path: Path
) -> None:
    from localmix.build.convert import convert
    from localmix.build.synth import checkpoints as synth

    ckpt = synth.checkpoint(tmp_path / "v3", arch="mistral", size="tiny", tokenizer="v3")
    v3 = convert(ckpt, tmp_path / "v3.gguf", outtype="f16")
    with pytest.raises(VocabularyMismatch) as mismatch:
        evaluate(v3, tiny_mistral_gguf_f16, settings=QUICK)
    assert "32768" in mismatch.value.message and mismatch.value.hint


def test_a_table_of_only_the_reference_is_refused(
    tiny_mistral_gguf_f16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from localmix.quality.quants import quant_table

    _import(capsys, tiny_mistral_gguf_f16)
    with pytest.raises(UsageError, match="nothing to compare"):
        quant_table("tiny", ["f16"])


@pytest.mark.parametrize(
    ("settings", "needle"),
    [({"n_ctx": 128}, "256"), ({"max_chunks": 0}, "--chunks")],
)
def test_settings_out_of_range(settings: dict[str, int], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        EvalSettings(**settings)


# ---- the CLI: one evaluation, and the table of quants ------------------------------------------


def test_cli_prints_llama_perplexity_numbers_and_json(
    tiny_mistral_gguf_f16: Path, tiny_q4: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("eval", str(tiny_q4), "--against", str(tiny_mistral_gguf_f16), "--chunks", "1")
    shown = run_cli(capsys, *args, "-t", "1")
    assert shown.code == 0, shown.err
    for label in ("PPL ratio", "mean KLD", "99.9% KLD", "same top token", "RMS Δp"):
        assert label in shown.out
    assert "scoring q4.gguf" in shown.err  # progress on stderr
    data = json.loads(run_cli(capsys, *args, "--json").out)
    assert data["scores"]["n_tokens"] == 255 and data["n_chunks"] == 1
    assert data["text"] == "langref" and data["reference"] == tiny_mistral_gguf_f16.name


@pytest.mark.slow
def test_a_table_of_quants_makes_the_missing_ones(
    tiny_mistral_gguf_f16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from localmix.models import store

    _import(capsys, tiny_mistral_gguf_f16)
    args = ("--chunks", "1", "-t", "1")  # one thread: a shared machine slows spinning threads
    result = run_cli(capsys, "eval", "tiny", "--quants", "Q8_0,q4_k_m,F16", *args)
    assert result.code == 0, result.err
    assert "making tiny:Q8_0 with localmix quantize" in result.err
    assert {m.quant for m in store.find("tiny")} == {"F16", "Q8_0", "Q4_K_M"}
    lines = result.out.split("\n\n")[0].splitlines()  # the table: what comes before the plot
    rows = {
        line.split()[0]: line
        for line in lines
        if line.split()[:1] in (["F16"], ["Q8_0"], ["Q4_K_M"])
    }
    assert "reference" in rows["F16"] and "made now" in rows["Q8_0"]
    assert "tiny · mean KLD" in result.out and "│" in result.out  # the plot
    again = json.loads(run_cli(capsys, "eval", "tiny", "-q", "Q4_K_M,Q8_0", *args,
                               "--json").out)  # fmt: skip
    quants = [row["quant"] for row in again["rows"]]
    assert quants == ["F16", "Q8_0", "Q4_K_M"]  # the reference, then by size
    kld = {row["quant"]: row["scores"]["kld_mean"] for row in again["rows"][1:]}
    assert 0 < kld["Q8_0"] < kld["Q4_K_M"]
    assert not any(row["made"] for row in again["rows"])  # made by the first run
    assert all(row["gen_tps"] > 0 and row["bits_per_weight"] > 0 for row in again["rows"])

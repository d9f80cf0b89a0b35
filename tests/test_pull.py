"""`localmix pull` and `import` against a real Hub on 127.0.0.1 (tests/hub_server.py), driven by the
real huggingface_hub client: file choice, resume, verification, offline, disk, gated, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from localmix.errors import CheckpointError, ModelNotFound
from localmix.models import repofiles, tags
from tests.hub_server import HubServer

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def fake_gguf(path: Path, n_bytes: int, *, seed: int = 0, file_type: int = 15) -> Path:
    """A valid GGUF header with one padding tensor of about n_bytes (not a runnable model)."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_file_type(file_type)  # 15 = Q4_K_M, what gguffile reports as the quant
    data = np.random.default_rng(seed).standard_normal(max(n_bytes // 4, 8)).astype(np.float32)
    writer.add_tensor("pad.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class Env:
    hub: HubServer
    hf_home: Path
    home: Path

    @property
    def cache(self) -> Path:
        return self.hf_home / "hub"

    def vars(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(
            HF_ENDPOINT=self.hub.endpoint,
            HF_HOME=str(self.hf_home),
            LOCALMIX_HOME=str(self.home),
            HF_HUB_DISABLE_TELEMETRY="1",
            NO_PROXY="127.0.0.1,localhost",
            COLUMNS="120",
            PYTHONPATH=str(ROOT),
        )
        env.update(extra)
        return env

    def cli(self, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "localmix", *args],
            env=self.vars(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def screen(self, *args: str, timeout: float = 300) -> list[str]:
        """Run the CLI on a pseudo-terminal and return the lines a person would see on it at the
        end (a terminal emulator replays every cursor move and redraw of the live bars)."""
        import pexpect
        import pyte

        env = self.vars(TERM="xterm-256color")
        env.pop("COLUMNS")
        child = pexpect.spawn(
            sys.executable, ["-m", "localmix", *args], env=env, cwd=str(ROOT),
            dimensions=(60, 110), timeout=timeout,
        )  # fmt: skip
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before.decode(errors="replace")[-2000:]
        screen = pyte.Screen(110, 60)
        pyte.ByteStream(screen).feed(child.before)
        return [line.rstrip() for line in screen.display if line.strip()]

    def listed(self) -> list[dict]:
        result = self.cli("list", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout or "[]")

    def blobs(self, repo: str) -> list[Path]:
        folder = self.cache / f"models--{repo.replace('/', '--')}" / "blobs"
        return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def env(tmp_path: Path, localmix_home: Path) -> Iterator[Env]:
    with HubServer() as server:
        yield Env(server, tmp_path / "hf-home", localmix_home)


def gguf_repo(tmp_path: Path, name: str, files: dict[str, int]) -> Path:
    folder = tmp_path / "repos" / name
    for seed, (filename, size) in enumerate(files.items()):
        fake_gguf(folder / filename, size, seed=seed)
    (folder / "README.md").write_text(f"# {name}\n")
    return folder


# --- choosing files (no network) ----------------------------------------------------------------

QUANT_CASES = [
    (["m.Q4_K_M.gguf", "m.Q5_K_M.gguf"], "q5_k_m", ["m.Q5_K_M.gguf"]),
    (["M-Q4_K_M.gguf", "M-Q8_0.gguf"], None, ["M-Q4_K_M.gguf"]),
    (["m-q8_0.gguf", "m-IQ3_XS.gguf"], "iq3_xs", ["m-IQ3_XS.gguf"]),
    (["m-f16.gguf", "mmproj-m-f16.gguf"], "F16", ["m-f16.gguf"]),
    (
        ["big-Q4_K_M-00002-of-00002.gguf", "big-Q4_K_M-00001-of-00002.gguf", "big-Q8_0.gguf"],
        "Q4_K_M",
        ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"],
    ),
    (
        ["Q4_K_M/big-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf"],
        None,
        ["Q4_K_M/big-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf"],
    ),
]


@pytest.mark.parametrize(("names", "quant", "expected"), QUANT_CASES)
def test_choose_gguf_picks_the_quant_and_every_shard(
    names: list[str], quant: str | None, expected: list[str]
) -> None:
    assert repofiles.choose_gguf([*names, "README.md"], quant)[1] == expected


def test_choose_gguf_without_that_quant_lists_the_quants_that_exist() -> None:
    with pytest.raises(ModelNotFound) as caught:
        repofiles.choose_gguf(["m.Q4_K_M.gguf", "m.Q5_K_M.gguf"], "Q8_0", repo="org/m")
    assert "Q8_0" in caught.value.message
    assert "Q4_K_M, Q5_K_M" in (caught.value.hint or "")


def test_choose_gguf_refuses_a_split_gguf_with_missing_parts() -> None:
    with pytest.raises(ModelNotFound, match="split into 3 parts"):
        repofiles.choose_gguf(
            ["b-Q4_K_M-00001-of-00003.gguf", "b-Q4_K_M-00002-of-00003.gguf"], None
        )


CHECKPOINT_CASES = [
    (
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
         "tokenizer_config.json", "pytorch_model.bin", "README.md", ".gitattributes"],
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
         "tokenizer_config.json"],
    ),
    (
        ["params.json", "consolidated.safetensors", "tokenizer.model.v3", "consolidated.00.pth"],
        ["consolidated.safetensors", "params.json", "tokenizer.model.v3"],
    ),
    (  # both layouts in one repo: only the HF one is downloaded
        ["config.json", "model.safetensors", "params.json", "consolidated.safetensors",
         "tekken.json"],
        ["config.json", "model.safetensors", "tekken.json"],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("names", "expected"), CHECKPOINT_CASES)
def test_checkpoint_files_take_safetensors_config_and_tokenizer(
    names: list[str], expected: list[str]
) -> None:
    assert repofiles.checkpoint_files(names) == expected


def test_checkpoint_files_refuse_pickled_weights() -> None:
    with pytest.raises(CheckpointError) as caught:
        repofiles.checkpoint_files(["config.json", "pytorch_model.bin", "tokenizer.model"])
    assert ".bin" in (caught.value.hint or "")


# --- runnable models: synth -> convert -> quantize, served by the local Hub ------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Mistral checkpoint (HF layout, v3 tokenizer), as a Hub repo serves it."""
    from localmix.build.synth import checkpoints as synth

    folder = tmp_path_factory.mktemp("hub-checkpoint")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALMIX_HOME", str(folder / "home"))
        return synth.checkpoint(folder / "tiny", arch="mistral", size="tiny", tokenizer="v3")


@pytest.fixture(scope="module")
def tiny_gguf_repo(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A GGUF repo with a Q4_K_M and a Q8_0 file made from the tiny checkpoint."""
    from localmix.build.convert import convert
    from localmix.build.quantize import quantize

    folder = tmp_path_factory.mktemp("hub-gguf")
    repo = folder / "repo"
    repo.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALMIX_HOME", str(folder / "home"))
        f16 = convert(tiny_checkpoint, folder / "tiny.f16.gguf", outtype="f16")
        for quant in ("Q4_K_M", "Q8_0"):
            quantize(f16, repo / f"tiny-mistral-{quant}.gguf", quant, threads=2)
    (repo / "README.md").write_text("# tiny mistral\n")
    return repo


def one_chat_turn(model: dict) -> str:
    """One demo chat turn on a pulled model: the reply's text (greedy, a few tokens)."""
    from localmix import load
    from localmix.chat.session import Session
    from localmix.llama.engine import Sampling, Stats

    settings = load.LoadSettings(ctx=256, threads=2)  # through the door: its CPU rule too
    with load.open_model(Path(model["path"]), settings) as loaded:
        session = Session(
            loaded.engine, model["chat_format"], sampling=Sampling.greedy(), max_tokens=8
        )
        events = list(session.send("Hello!"))
    stats = events[-1]
    assert isinstance(stats, Stats) and stats.generated_tokens > 0
    return "".join(getattr(e, "text", "") for e in events)


@pytest.mark.slow
def test_pull_gguf_repo_ends_with_a_model_that_chats(env: Env, tiny_gguf_repo: Path) -> None:
    env.hub.add_repo("org/tiny-mistral-GGUF", tiny_gguf_repo)
    result = env.cli("pull", "hf.co/org/tiny-mistral-GGUF:Q8_0")
    assert result.returncode == 0, result.stderr
    (model,) = env.listed()
    assert (model["quant"], model["owned"], model["architecture"]) == ("Q8_0", False, "llama")
    one_chat_turn(model)


@pytest.mark.slow
def test_pull_checkpoint_repo_converts_quantizes_and_chats(env: Env, tiny_checkpoint: Path) -> None:
    env.hub.add_repo("org/tiny-mistral", tiny_checkpoint)
    result = env.cli("pull", "org/tiny-mistral")
    assert result.returncode == 0, result.stderr
    (model,) = env.listed()
    assert (model["name"], model["quant"], model["owned"]) == ("org--tiny-mistral", "Q4_K_M", True)
    assert Path(model["path"]).is_relative_to(env.home)
    assert "converting" in result.stderr and "quantizing" in result.stderr
    leftovers = [p for p in (env.home / "tmp").glob("*") if p.is_file()]
    assert leftovers == []  # the f16 intermediate is gone
    assert not [p for p in env.blobs("org/tiny-mistral") if p.stat().st_size > 100_000]
    one_chat_turn(model)


@pytest.mark.slow
def test_pull_display_on_a_terminal_reads_in_order(env: Env, tiny_checkpoint: Path) -> None:
    env.hub.add_repo("org/tiny-mistral", tiny_checkpoint)
    lines = env.screen("pull", "org/tiny-mistral")
    order = [
        next(i for i, line in enumerate(lines) if line.startswith(word))
        for word in ("resolving", "↓ model.safetensors", "converting", "quantizing", "registering")
    ]
    assert order == sorted(order), lines  # registering follows the bars it comes after
    assert sum(line.startswith("↓ model.safetensors") for line in lines) == 1, lines
    assert lines[-2].startswith("pulled org--tiny-mistral:Q4_K_M"), lines


@pytest.mark.slow
def test_a_dropped_connection_is_one_line_above_one_bar(env: Env, tmp_path: Path) -> None:
    name = "d.Q4_K_M.gguf"
    repo = gguf_repo(tmp_path, "d", {name: 4 * MiB})
    size = (repo / name).stat().st_size
    env.hub.add_repo("org/d-GGUF", repo)
    env.hub.fault(name, drop_after=size // 3, rate=8 * MiB)
    lines = env.screen("pull", "hf.co/org/d-GGUF")
    text = "\n".join(lines)
    # huggingface_hub's own warning (URL, raw httpx text) never reaches the screen
    assert "Error while downloading" not in text and "127.0.0.1" not in text, text
    (retry,) = [line for line in lines if line.endswith("; resuming")]
    assert retry.startswith(f"{name}: peer closed connection") and " at 1.3 MiB" in retry, text
    bars = [i for i, line in enumerate(lines) if line.startswith(f"↓ {name}")]
    assert len(bars) == 1 and lines.index(retry) < bars[0], text
    assert "100%" in lines[bars[0]] and "4.0/4.0 MiB" in lines[bars[0]], text


@pytest.mark.slow
def test_pull_checkpoint_keep_source_keeps_the_f16_and_the_download(
    env: Env, tiny_checkpoint: Path
) -> None:
    env.hub.add_repo("org/tiny-mistral", tiny_checkpoint)
    result = env.cli("pull", "org/tiny-mistral:Q8_0", "--keep-source")
    assert result.returncode == 0, result.stderr
    assert sorted(m["quant"] for m in env.listed()) == ["F16", "Q8_0"]
    snapshots = env.cache / "models--org--tiny-mistral" / "snapshots"
    assert list(snapshots.glob("*/*.safetensors"))  # the checkpoint stays in the HF cache


@pytest.mark.slow
def test_pull_checkpoint_to_a_low_bit_type_takes_an_imatrix(
    env: Env, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from localmix.build.convert import convert

    from .imatrix_files import write_gguf_imatrix

    env.hub.add_repo("org/tiny-mistral", tiny_checkpoint)
    refused = env.cli("pull", "org/tiny-mistral:IQ2_XS")
    assert refused.returncode == 2 and "--imatrix" in refused.stderr
    assert not [r for r in env.hub.requests if (r.file or "").endswith(".safetensors")]
    f16 = convert(tiny_checkpoint, tmp_path / "f16.gguf", outtype="f16")
    matrix = write_gguf_imatrix(f16, tmp_path / "imatrix.gguf")
    result = env.cli("pull", "org/tiny-mistral:IQ2_XS", "--imatrix", str(matrix))
    assert result.returncode == 0, result.stderr
    (model,) = env.listed()
    assert model["quant"] == "IQ2_XS"
    one_chat_turn(model)


@pytest.mark.slow
def test_pull_checkpoint_with_imatrix_auto_calibrates_then_quantizes(
    env: Env, tiny_checkpoint: Path, tiny_gguf_repo: Path
) -> None:
    from localmix.build.imatrix import files as importance

    env.hub.add_repo("org/tiny-mistral", tiny_checkpoint)
    result = env.cli("pull", "org/tiny-mistral:IQ2_XS", "--imatrix", "auto")
    assert result.returncode == 0, result.stderr
    assert "computing the importance matrix" in result.stderr and "quantizing" in result.stderr
    (model,) = env.listed()
    assert (model["name"], model["quant"]) == ("org--tiny-mistral", "IQ2_XS")
    matrix = importance.load(env.home / "models" / "org--tiny-mistral" / "imatrix.gguf")
    assert matrix.chunks > 100 and len(matrix.values) == 14  # the whole default text, 7 per layer
    # a ready GGUF is not quantized here: an importance matrix has nothing to guide
    env.hub.add_repo("org/tiny-mistral-GGUF", tiny_gguf_repo)
    refused = env.cli("pull", "hf.co/org/tiny-mistral-GGUF:Q8_0", "--imatrix", "auto")
    assert refused.returncode == 2 and "--from-source" in refused.stderr
    assert not [r for r in env.hub.requests if (r.file or "").endswith(".gguf")]


# --- the journeys, through the CLI --------------------------------------------------------------


@pytest.mark.slow
def test_pull_gguf_repo_registers_the_cached_file_in_place(env: Env, tmp_path: Path) -> None:
    repo = gguf_repo(tmp_path, "a", {"a.Q4_K_M.gguf": 2 * MiB, "a.Q8_0.gguf": 3 * MiB})
    env.hub.add_repo("org/a-GGUF", repo)
    result = env.cli("pull", "hf.co/org/a-GGUF")
    assert result.returncode == 0, result.stderr
    (model,) = env.listed()
    assert (model["name"], model["quant"], model["owned"]) == ("org--a-gguf", "Q4_K_M", False)
    assert Path(model["path"]).is_relative_to(env.cache)  # no copy: the HF cache's file
    assert model["hub_files"] == [model["path"]]
    assert env.hub.bytes_served("a.Q8_0.gguf") == 0  # only the quant asked for
    assert env.hub.bytes_served("a.Q4_K_M.gguf") == (repo / "a.Q4_K_M.gguf").stat().st_size
    again = env.cli("pull", "hf.co/org/a-GGUF:q4_k_m", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["path"] == model["path"]


@pytest.mark.slow
def test_the_string_that_pulled_a_model_works_in_show_and_rm(env: Env, tmp_path: Path) -> None:
    env.hub.add_repo("Org/N-GGUF", gguf_repo(tmp_path, "n", {"n.Q4_K_M.gguf": MiB}))
    typed = "hf.co/Org/N-GGUF:Q4_K_M"
    assert env.cli("pull", typed).returncode == 0
    shown = env.cli("show", typed, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["manifest"]["name"] == "org--n-gguf"
    (listed,) = env.listed()
    assert env.cli("show", f"{listed['name']}:{listed['quant']}").returncode == 0
    removed = env.cli("rm", typed)
    assert removed.returncode == 0, removed.stderr
    assert env.listed() == []


@pytest.mark.slow
def test_pull_reuses_a_file_another_hf_tool_downloaded(env: Env, tmp_path: Path) -> None:
    name = "t.Q4_K_M.gguf"
    env.hub.add_repo("org/t-GGUF", gguf_repo(tmp_path, "t", {name: 2 * MiB}))
    other_tool = (
        f"from huggingface_hub import hf_hub_download; hf_hub_download('org/t-GGUF', {name!r})"
    )
    done = subprocess.run([sys.executable, "-c", other_tool], env=env.vars(), capture_output=True)
    assert done.returncode == 0, done.stderr
    env.hub.reset_log()
    result = env.cli("pull", "hf.co/org/t-GGUF")
    assert result.returncode == 0, result.stderr
    assert env.hub.bytes_served(name) == 0  # verified and registered, not downloaded again
    assert "sha256" in result.stderr


@pytest.mark.slow
def test_pull_split_gguf_fetches_every_shard(env: Env, tmp_path: Path) -> None:
    names = {f"big-Q4_K_M-0000{i}-of-00002.gguf": MiB for i in (1, 2)}
    env.hub.add_repo("org/big-GGUF", gguf_repo(tmp_path, "big", names))
    result = env.cli("pull", "hf.co/org/big-GGUF:Q4_K_M")
    assert result.returncode == 0, result.stderr
    (model,) = env.listed()
    assert model["path"].endswith("-00001-of-00002.gguf")
    assert [Path(p).name for p in model["extra_files"]] == ["big-Q4_K_M-00002-of-00002.gguf"]


@pytest.mark.slow
def test_pull_revision_fetches_that_commit(env: Env, tmp_path: Path) -> None:
    old = env.hub.add_repo(
        "org/r-GGUF", gguf_repo(tmp_path, "v1", {"r.Q4_K_M.gguf": MiB}), revision="v1"
    )
    env.hub.add_repo("org/r-GGUF", gguf_repo(tmp_path, "v2", {"r.Q4_K_M.gguf": 2 * MiB}))
    result = env.cli("pull", "hf.co/org/r-GGUF", "--revision", "v1")
    assert result.returncode == 0, result.stderr
    (model,) = env.listed()
    assert model["source"] == f"hf:org/r-GGUF@{old}"


@pytest.mark.slow
def test_pull_killed_midway_resumes_from_the_bytes_on_disk(env: Env, tmp_path: Path) -> None:
    name = "big.Q4_K_M.gguf"
    repo = gguf_repo(tmp_path, "big", {name: 8 * MiB})
    size = (repo / name).stat().st_size
    env.hub.add_repo("org/big-GGUF", repo)
    env.hub.fault(name, rate=2 * MiB)  # ~4 s for the file: time to kill it halfway
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmix", "pull", "hf.co/org/big-GGUF"],
        env=env.vars(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while env.hub.bytes_served(name) < size // 2 and time.monotonic() < deadline:
        assert proc.poll() is None, "the pull ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.3)  # let the server notice the closed socket
    served_before = env.hub.bytes_served(name)
    assert size // 2 <= served_before < size
    partial = [p for p in env.blobs("org/big-GGUF") if p.name.endswith(".incomplete")]
    assert partial and partial[0].stat().st_size > 0

    env.hub.clear_faults()
    env.hub.reset_log()
    result = env.cli("pull", "hf.co/org/big-GGUF")
    assert result.returncode == 0, result.stderr
    fetched = env.hub.bytes_served(name)
    assert fetched <= size - served_before + MiB, (fetched, size, served_before)
    assert any(r.range_start > 0 for r in env.hub.requests if r.file == name)
    assert [m["quant"] for m in env.listed()] == ["Q4_K_M"]


@pytest.mark.slow
def test_pull_resumes_after_a_dropped_connection(env: Env, tmp_path: Path) -> None:
    name = "d.Q4_K_M.gguf"
    repo = gguf_repo(tmp_path, "d", {name: 4 * MiB})
    size = (repo / name).stat().st_size
    env.hub.add_repo("org/d-GGUF", repo)
    env.hub.fault(name, drop_after=size // 3)
    result = env.cli("pull", "hf.co/org/d-GGUF")
    assert result.returncode == 0, result.stderr
    assert "Error while downloading" not in result.stderr  # huggingface_hub's raw warning
    assert f"{name}: peer closed connection without sending complete message body" in result.stderr
    assert env.hub.bytes_served(name) == size  # continued from the bytes on disk: none twice
    gets = [r for r in env.hub.requests if r.file == name and r.method == "GET"]
    assert [r.range_start for r in gets] == [0, size // 3]


@pytest.mark.slow
def test_pull_resumes_after_several_drops_in_one_file(env: Env, tmp_path: Path) -> None:
    name = "s.Q4_K_M.gguf"
    repo = gguf_repo(tmp_path, "s", {name: 4 * MiB})
    size = (repo / name).stat().st_size
    env.hub.add_repo("org/s-GGUF", repo)
    env.hub.fault(name, drop_after=size // 5, times=3)
    result = env.cli("pull", "hf.co/org/s-GGUF")
    assert result.returncode == 0, result.stderr
    assert env.hub.bytes_served(name) == size
    gets = [r for r in env.hub.requests if r.file == name and r.method == "GET"]
    assert [r.range_start for r in gets] == [0, size // 5, 2 * (size // 5), 3 * (size // 5)]
    assert [m["quant"] for m in env.listed()] == ["Q4_K_M"]


@pytest.mark.slow
def test_pull_resumes_after_a_reset_connection(env: Env, tmp_path: Path) -> None:
    """A TCP reset (ReadError) is one huggingface_hub's http_get does not retry by itself."""
    name = "r.Q4_K_M.gguf"
    repo = gguf_repo(tmp_path, "r", {name: 4 * MiB})
    size = (repo / name).stat().st_size
    env.hub.add_repo("org/r-GGUF", repo)
    env.hub.fault(name, drop_after=size // 2, reset=True)
    result = env.cli("pull", "hf.co/org/r-GGUF")
    assert result.returncode == 0, result.stderr
    gets = [r for r in env.hub.requests if r.file == name and r.method == "GET"]
    assert len(gets) == 2 and gets[1].range_start > 0  # resumed, not restarted
    # a reset may discard bytes the client had not read yet; all others are not fetched again
    assert env.hub.bytes_served(name) < size + size // 2


@pytest.mark.slow
def test_pull_with_a_corrupted_byte_fails_clearly_and_keeps_nothing(
    env: Env, tmp_path: Path
) -> None:
    name = "c.Q4_K_M.gguf"
    repo = gguf_repo(tmp_path, "c", {name: 2 * MiB})
    size = (repo / name).stat().st_size
    env.hub.add_repo("org/c-GGUF", repo)
    env.hub.fault(name, corrupt_at=size // 2)
    result = env.cli("pull", "hf.co/org/c-GGUF")
    assert result.returncode == 8, result.stderr
    assert "error:" in result.stderr and name in result.stderr and "sha256" in result.stderr
    assert "Traceback" not in result.stderr
    assert not [p for p in env.blobs("org/c-GGUF") if p.stat().st_size > 1000]  # bad file gone
    assert env.listed() == []
    assert env.hub.bytes_served(name) == size  # downloaded once: no silent second try


@pytest.mark.slow
def test_pull_offline_with_the_model_cached_makes_no_request(env: Env, tmp_path: Path) -> None:
    env.hub.add_repo("org/o-GGUF", gguf_repo(tmp_path, "o", {"o.Q4_K_M.gguf": MiB}))
    assert env.cli("pull", "hf.co/org/o-GGUF").returncode == 0
    assert env.cli("rm", "org--o-gguf").returncode == 0  # the HF cache keeps the file
    env.hub.reset_log()
    result = env.cli("pull", "hf.co/org/o-GGUF", "--offline")
    assert result.returncode == 0, result.stderr
    assert env.cli("rm", "org--o-gguf").returncode == 0
    result = env.cli("pull", "hf.co/org/o-GGUF", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert [m["name"] for m in env.listed()] == ["org--o-gguf"]
    assert env.hub.requests == []


@pytest.mark.slow
def test_pull_offline_without_the_model_fails_without_touching_the_network(env: Env) -> None:
    for extra_args, extra_env in ((["--offline"], {}), ([], {"HF_HUB_OFFLINE": "1"})):
        result = env.cli("pull", "hf.co/org/absent-GGUF", *extra_args, **extra_env)
        assert result.returncode == 7, result.stderr
        assert "offline" in result.stderr and "hint:" in result.stderr
    assert env.hub.requests == []


@pytest.mark.slow
def test_pull_refuses_before_downloading_when_the_disk_is_too_small(
    env: Env, tmp_path: Path
) -> None:
    name = "huge.Q4_K_M.gguf"
    repo = gguf_repo(tmp_path, "huge", {name: MiB})
    env.hub.add_repo("org/huge-GGUF", repo, claimed_sizes={name: 1 << 50})  # a 1 PiB file
    result = env.cli("pull", "hf.co/org/huge-GGUF")
    assert result.returncode == 9, result.stderr
    assert "not enough disk space" in result.stderr and "GiB" in result.stderr
    assert not [r for r in env.hub.requests if "/resolve/" in r.path or r.server == "cdn"]


@pytest.mark.slow
def test_pull_gated_repo_hint_names_the_model_page(env: Env, tmp_path: Path) -> None:
    repo = gguf_repo(tmp_path, "g", {"g.Q4_K_M.gguf": MiB})
    env.hub.add_repo("org/gated-GGUF", repo, gated=True, tokens=("hf_accepted",))
    result = env.cli("pull", "hf.co/org/gated-GGUF")
    assert result.returncode == 7, result.stderr
    page = f"{env.hub.endpoint}/org/gated-GGUF"
    assert "gated" in result.stderr and page in result.stderr.replace("\n", "")
    assert "HF_TOKEN" in result.stderr
    assert env.cli("pull", "hf.co/org/gated-GGUF", HF_TOKEN="hf_accepted").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("reference", "code", "needles"),
    [
        ("mistrall", 3, ["unknown model", "did you mean"]),
        ("hf.co/org/nothing-GGUF", 3, ["no repository", "org/nothing-GGUF"]),
        ("hf.co/org/q-GGUF:Q8_0", 3, ["no Q8_0 file", "Q4_K_M, Q5_K_M"]),
    ],
)
def test_pull_errors_say_what_to_do(
    env: Env, tmp_path: Path, reference: str, code: int, needles: list[str]
) -> None:
    env.hub.add_repo(
        "org/q-GGUF", gguf_repo(tmp_path, "q", {"q.Q4_K_M.gguf": MiB, "q.Q5_K_M.gguf": MiB})
    )
    result = env.cli("pull", reference)
    assert result.returncode == code, result.stderr
    text = result.stderr.replace("\n", " ")
    for needle in needles:
        assert needle in text
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_pull_with_the_network_down_says_so(env: Env) -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = env.cli("pull", "hf.co/org/x-GGUF", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert result.returncode == 7, result.stderr
    assert "cannot reach the Hub" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_pull_from_a_hub_too_slow_gives_up_after_retries_and_keeps_nothing_broken(
    env: Env, tmp_path: Path
) -> None:
    name = "s.Q4_K_M.gguf"
    env.hub.add_repo("org/s-GGUF", gguf_repo(tmp_path, "s", {name: MiB}))
    env.hub.fault(name, delay_s=2.5, times=20)
    result = env.cli("pull", "hf.co/org/s-GGUF", HF_HUB_DOWNLOAD_TIMEOUT="1")
    assert result.returncode == 7, result.stderr
    assert "too slow" in result.stderr and "Traceback" not in result.stderr
    assert len([r for r in env.hub.requests if r.file == name]) > 1  # it retried
    assert env.listed() == []


@pytest.mark.slow
def test_rm_purge_cache_deletes_only_files_no_other_model_uses(env: Env, tmp_path: Path) -> None:
    repo = gguf_repo(tmp_path, "p", {"p.Q4_K_M.gguf": MiB, "p.Q8_0.gguf": MiB})
    env.hub.add_repo("org/p-GGUF", repo)
    assert env.cli("pull", "hf.co/org/p-GGUF:Q4_K_M").returncode == 0
    assert env.cli("pull", "hf.co/org/p-GGUF:Q8_0").returncode == 0
    q8 = next(m for m in env.listed() if m["quant"] == "Q8_0")
    assert env.cli("rm", "org--p-gguf:Q4_K_M", "--purge-cache").returncode == 0
    assert Path(q8["path"]).exists()
    large = [p for p in env.blobs("org/p-GGUF") if p.stat().st_size > 1000]
    assert len(large) == 1 and Path(q8["path"]).resolve() == large[0]


# --- import -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_import_registers_by_reference_or_copies(env: Env, tmp_path: Path) -> None:
    path = fake_gguf(tmp_path / "mine.Q4_K_M.gguf", MiB)
    result = env.cli("import", str(path))
    assert result.returncode == 0, result.stderr
    result = env.cli("import", str(path), "--name", "copied", "--copy")
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in env.listed()}
    assert models["mine"]["path"] == str(path) and models["mine"]["owned"] is False
    assert models["copied"]["owned"] is True
    assert Path(models["copied"]["path"]).is_relative_to(env.home)
    assert env.cli("rm", "copied").returncode == 0 and path.exists()


@pytest.mark.slow
def test_import_rejects_a_file_that_is_not_gguf(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    result = env.cli("import", str(bad))
    assert result.returncode == 6 and "not a GGUF file" in result.stderr
    assert env.listed() == []


@pytest.mark.slow
def test_a_token_in_hf_endpoint_is_never_printed(env: Env) -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://user:hf_SECRETtoken@127.0.0.1:{port}"
    result = env.cli("pull", "hf.co/org/x-GGUF", HF_ENDPOINT=endpoint)
    assert result.returncode == 7, result.stderr
    assert "cannot reach the Hub" in result.stderr
    assert "SECRET" not in result.stderr + result.stdout and "user:" not in result.stderr


@pytest.mark.parametrize(
    "revision", ["../../../../X", "main/../../x", "/etc", "a\\b", "v1\x00", "", "."]
)
def test_a_revision_that_could_escape_the_cache_is_refused(revision: str) -> None:
    from localmix.errors import UsageError
    from localmix.models import hub

    with pytest.raises(UsageError, match="not a revision"):
        hub.repo_files("org/x-GGUF", revision)


@pytest.mark.parametrize("repo", ["org/../x", "../x", "org/x/y", "/x", "org/", "a b/c"])
def test_a_repo_id_that_is_not_org_name_is_refused(repo: str) -> None:
    from localmix.errors import UsageError
    from localmix.models import hub

    with pytest.raises(UsageError, match="repository id"):
        hub.repo_files(repo, "main")


def test_hub_file_names_that_leave_the_snapshot_are_never_offered() -> None:
    from localmix.models import hub

    assert [n for n in ("a.gguf", "d/a.gguf", "../a.gguf", "/a", "d/../../a", "a\\b")
            if hub._safe_file_name(n)] == ["a.gguf", "d/a.gguf"]  # fmt: skip


@pytest.mark.slow
def test_pull_revision_with_dot_dot_writes_nothing(env: Env, tmp_path: Path) -> None:
    env.hub.add_repo("org/r-GGUF", gguf_repo(tmp_path, "v1", {"r.Q4_K_M.gguf": MiB}))
    before = {p for p in tmp_path.rglob("*")}
    result = env.cli("pull", "hf.co/org/r-GGUF:Q4_K_M", "--revision", "../../../../X")
    assert result.returncode == 2, result.stderr
    assert "not a revision" in result.stderr and "hint:" in result.stderr
    assert {p for p in tmp_path.rglob("*") if p.is_file()} <= before


# --- the catalog's own repos: file names per quant, odd layouts -----------------------------------


def _catalog_gguf_specs() -> list:
    from localmix.models import catalog

    return [s for s in catalog.load().models.values() if s.gguf_repo]


@pytest.mark.parametrize("spec", _catalog_gguf_specs(), ids=lambda s: s.name)
def test_every_catalog_quant_resolves_to_the_file_the_catalog_names(spec: object) -> None:
    """Each listed quant's file name carries the tag the catalog looks for, and a repo holding
    those files (plus a vision projector, and a split copy in a folder) yields it."""
    names = [spec.gguf_file(q) for q in spec.quants]  # type: ignore[attr-defined]
    noise = ["mmproj-F16.gguf", "imatrix.gguf", "README.md"]
    for quant, name in zip(spec.quants, names, strict=True):  # type: ignore[attr-defined]
        tag = spec.file_quant(quant)  # type: ignore[attr-defined]
        assert tags.in_filename(name) == tag.upper(), name
        picked, files = repofiles.choose_gguf(names + noise, tag, preferred=name)
        assert (picked, files) == (tag.upper(), [name])
    assert spec.default_quant in spec.quants  # type: ignore[attr-defined]


def test_mixtral_8x22b_lists_no_quant_its_repo_lost() -> None:
    from localmix.models import catalog

    spec = catalog.load().get("mixtral:8x22b")
    assert not [q for q in spec.quants if q.startswith("Q3_K")]  # partly deleted in April 2024
    assert spec.gguf_file("Q6_K") == "Mixtral-8x22B-Instruct-v0.1.Q6.gguf"


@pytest.mark.slow
def test_pull_catalog_q6_k_of_mixtral_8x22b_takes_the_q6_files(env: Env, tmp_path: Path) -> None:
    """MaziyarPanahi names the 6-bit files ...Q6-0000N-of-00004.gguf: `mixtral:8x22b:q6_k` pulls
    all four and registers them as Q6_K."""
    stem = "Mixtral-8x22B-Instruct-v0.1"
    files = {f"{stem}.Q6-0000{i}-of-00004.gguf": 64 << 10 for i in range(1, 5)}
    files |= {f"{stem}.Q4_K_M-0000{i}-of-00002.gguf": 64 << 10 for i in (1, 2)}
    env.hub.add_repo(
        "MaziyarPanahi/Mixtral-8x22B-Instruct-v0.1-GGUF", gguf_repo(tmp_path, "8x22b", files)
    )
    result = env.cli("pull", "mixtral:8x22b:q6_k")
    assert result.returncode == 0, result.stderr
    (model,) = env.listed()
    assert (model["name"], model["quant"], model["chat_format"]) == ("mixtral:8x22b", "Q6_K", "v3")
    assert model["path"].endswith(".Q6-00001-of-00004.gguf")
    assert len(model["extra_files"]) == 3
    served = [env.hub.bytes_served(name) for name in files]
    again = env.cli("pull", "mixtral:8x22b:Q6_K")  # found under the catalog's name
    assert again.returncode == 0, again.stderr
    assert [env.hub.bytes_served(name) for name in files] == served  # nothing fetched again
    assert len(env.listed()) == 1


@pytest.mark.slow
def test_pull_catalog_models_in_folders_and_with_prefixed_names(env: Env, tmp_path: Path) -> None:
    """unsloth keeps a big quant's split files in a folder named after the quant (Mistral Small
    4); bartowski prefixes files with the publisher (mistralai_...); projectors are left alone."""
    small4 = "Mistral-Small-4-119B-2603"
    env.hub.add_repo(
        "unsloth/Mistral-Small-4-119B-2603-GGUF",
        gguf_repo(
            tmp_path,
            "small4",
            {
                **{f"Q4_K_M/{small4}-Q4_K_M-0000{i}-of-00002.gguf": 64 << 10 for i in (1, 2)},
                f"Q8_0/{small4}-Q8_0-00001-of-00003.gguf": 64 << 10,  # an incomplete quant
                "mmproj-F16.gguf": 64 << 10,
            },
        ),
    )
    small32 = "mistralai_Mistral-Small-3.2-24B-Instruct-2506"
    env.hub.add_repo(
        f"bartowski/{small32}-GGUF",
        gguf_repo(
            tmp_path, "small32", {f"{small32}-Q4_K_M.gguf": MiB, f"{small32}-Q8_0.gguf": MiB}
        ),
    )
    assert env.cli("pull", "mistral-small").returncode == 0  # the alias of mistral-small:4
    assert env.cli("pull", "mistral-small:3.2").returncode == 0
    models = {m["name"]: m for m in env.listed()}
    small4_model = models["mistral-small:4"]
    assert (small4_model["quant"], small4_model["chat_format"]) == ("Q4_K_M", "v15")
    assert small4_model["path"].endswith(f"Q4_K_M/{small4}-Q4_K_M-00001-of-00002.gguf")
    assert [Path(p).name for p in small4_model["extra_files"]] == [
        f"{small4}-Q4_K_M-00002-of-00002.gguf"
    ]
    assert models["mistral-small:3.2"]["path"].endswith(f"{small32}-Q4_K_M.gguf")
    assert models["mistral-small:3.2"]["chat_format"] == "v11"
    broken = env.cli("pull", "mistral-small:4:q8_0")
    assert broken.returncode != 0 and "split into 3 parts but 1" in broken.stderr

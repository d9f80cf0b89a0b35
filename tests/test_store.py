from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from localmix.errors import ModelNotFound
from localmix.models import store


def _manifest(name: str, quant: str, path: Path) -> store.Manifest:
    return store.Manifest(
        name=name,
        quant=quant,
        path=str(path),
        size=path.stat().st_size,
        sha256=store.sha256_file(path),
        architecture="mistral",
        chat_format="v1",
        context_length=2048,
        parameters=1000,
        source="test",
        created=time.time(),
    )


def test_add_moves_the_file_and_writes_the_manifest_last(tmp_path: Path) -> None:
    src = tmp_path / "x.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 100)
    added = store.add(_manifest("m", "Q4_K_M", src), src=src)
    assert not src.exists()
    assert added.file == store.model_path("m", "Q4_K_M") and added.file.exists()
    assert [m.ref for m in store.list_models()] == ["m:Q4_K_M"]
    assert store.get("m").ref == "m:Q4_K_M"
    assert store.get("m:q4_k_m").ref == "m:Q4_K_M"


def test_get_prefers_q4_k_m_among_quants(tmp_path: Path) -> None:
    for quant in ("Q8_0", "Q4_K_M", "F16"):
        src = tmp_path / f"{quant}.gguf"
        src.write_bytes(b"GGUF" + quant.encode())
        store.add(_manifest("m", quant, src), src=src)
    assert store.get("m").quant == "Q4_K_M"
    assert store.get("m:Q8_0").quant == "Q8_0"


def test_remove_deletes_owned_files_and_keeps_referenced_ones(tmp_path: Path) -> None:
    owned = tmp_path / "a.gguf"
    owned.write_bytes(b"GGUF1")
    referenced = tmp_path / "b.gguf"
    referenced.write_bytes(b"GGUF2")
    a = store.add(_manifest("a", "Q4_K_M", owned), src=owned)
    store.add(dataclasses.replace(_manifest("b", "Q4_K_M", referenced), owned=False))
    store.remove("a")
    store.remove("b")
    assert not a.file.exists()
    assert referenced.exists()
    assert store.list_models() == []
    with pytest.raises(ModelNotFound):
        store.get("a")


def test_damaged_manifest_hides_one_model_only(tmp_path: Path) -> None:
    src = tmp_path / "a.gguf"
    src.write_bytes(b"GGUF")
    store.add(_manifest("a", "Q4_K_M", src), src=src)
    bad = store.settings.manifests_dir() / "b" / "Q4_K_M.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    assert [m.ref for m in store.list_models()] == ["a:Q4_K_M"]


def test_tmp_file_is_removed_when_not_renamed() -> None:
    with store.tmp_file() as path:
        path.write_bytes(b"partial")
    assert not path.exists()
    assert store.du().tmp_bytes == 0


def test_clean_tmp_removes_leftovers_of_dead_processes_only(localmix_home: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    tmp = localmix_home / "tmp"
    tmp.mkdir(parents=True)
    left = [tmp / f".model.gguf.{dead}.0a1b2c3d.partial", tmp / "unnamed-leftover.gguf"]
    live = tmp / ".model.gguf.1.0a1b2c3d.partial"  # pid 1 is always alive: work in progress
    for path in (*left, live):
        path.write_bytes(b"x" * 10)
    assert store.du().tmp_bytes == 30  # counted until cleaned
    assert store.clean_tmp() == 20
    assert not any(p.exists() for p in left) and live.exists()


@pytest.mark.parametrize(
    ("pulled_as", "store_name", "quant"),
    [
        ("hf.co/Org/Some-GGUF:Q4_K_M", "org--some-gguf", "Q4_K_M"),
        ("hf.co/Org/Some-GGUF", "org--some-gguf", "Q8_0"),
        ("Org/Some-Checkpoint", "org--some-checkpoint", "Q4_K_M"),
        ("Org/Some-Checkpoint:q4_k_m", "org--some-checkpoint", "Q4_K_M"),
        ("mistral", "mistral:v0.3", "Q4_K_M"),
        ("mistral:q4_k_m", "mistral:v0.3", "Q4_K_M"),
    ],
)
def test_the_name_a_model_was_pulled_by_names_it_everywhere(
    tmp_path: Path, pulled_as: str, store_name: str, quant: str
) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 100)
    store.add(_manifest(store_name, quant, src), src=src)
    assert store.get(pulled_as).ref == f"{store_name}:{quant}"  # chat, bench, show
    assert store.locate(pulled_as).name == f"{store_name}:{quant}"
    assert [m.ref for m in store.remove(pulled_as)] == [f"{store_name}:{quant}"]
    assert store.list_models() == []


def test_a_pulled_name_with_another_quant_is_not_found(tmp_path: Path) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 100)
    store.add(_manifest("org--some-gguf", "Q4_K_M", src), src=src)
    with pytest.raises(ModelNotFound):
        store.get("hf.co/org/Some-GGUF:Q8_0")


def test_list_shows_long_names_whole_and_abbreviates_the_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.cli_run import run_cli

    monkeypatch.setenv("COLUMNS", "100")
    long_name = "bartowski--mistral-small-3.2-24b-instruct-2506-gguf-with-a-long-tail"
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 100)
    commit = "0123456789abcdef0123456789abcdef01234567"
    manifest = dataclasses.replace(_manifest(long_name, "Q4_K_M", src), source=f"hf:o/r@{commit}")
    store.add(manifest, src=src)
    done = run_cli(capsys, "list")
    assert done.code == 0, done.err
    assert long_name in done.out and "@0123456789ab" in done.out and commit not in done.out


# --- a store that is copied or moved ------------------------------------------------------------


def _two_models(gguf: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """In `home`: `own` (copied in, owned) and `ref` (registered by reference to a file outside)."""
    from localmix.models import pull

    monkeypatch.setenv("LOCALMIX_HOME", str(home))
    outside = home.parent / "outside.gguf"
    outside.write_bytes(gguf.read_bytes())
    own = pull.import_gguf(gguf, name="own", copy=True)
    pull.import_gguf(outside, name="ref")
    return own.file, outside


def _loads(path: Path) -> None:
    from localmix.load import LoadSettings, open_model

    with open_model(path, LoadSettings(ctx=256, threads=1)) as loaded:
        assert loaded.engine is not None


def _as_version_1(home: Path) -> None:
    """Rewrite every manifest as localmix wrote them before: absolute paths everywhere."""
    import json

    for path in (home / "manifests").glob("*/*.json"):
        data = json.loads(path.read_text())
        data["path"] = (
            str(home / data["path"]) if not data["path"].startswith("/") else data["path"]
        )
        data["version"] = 1
        path.write_text(json.dumps(data))


def test_manifests_store_paths_inside_the_home_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mistral_gguf_f16: Path
) -> None:
    import json

    home = tmp_path / "a"
    own, outside = _two_models(tiny_mistral_gguf_f16, home, monkeypatch)
    on_disk = {
        p.parent.name: json.loads(p.read_text()) for p in (home / "manifests").glob("*/*.json")
    }
    assert on_disk["own"]["path"] == "models/own/F16.gguf" and on_disk["own"]["version"] == 2
    assert on_disk["ref"]["path"] == str(outside)  # by reference: absolute
    assert store.get("own").file == own  # absolute again in memory


@pytest.mark.parametrize("version", [2, 1])
def test_rm_in_a_copied_store_never_touches_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mistral_gguf_f16: Path, version: int
) -> None:
    import shutil

    original = tmp_path / "a"
    own, outside = _two_models(tiny_mistral_gguf_f16, original, monkeypatch)
    if version == 1:
        _as_version_1(original)
    copy = tmp_path / "b"
    shutil.copytree(original, copy)

    monkeypatch.setenv("LOCALMIX_HOME", str(copy))
    mine = store.get("own")
    assert mine.file == copy / "models" / "own" / "F16.gguf" and mine.owned  # its own copy
    assert store.get("ref").file == outside and not store.get("ref").owned
    store.remove("own")
    store.remove("ref")
    assert store.list_models() == [] and not mine.file.exists()

    monkeypatch.setenv("LOCALMIX_HOME", str(original))
    assert own.exists() and outside.exists()
    assert [m.ref for m in store.list_models()] == ["own:F16", "ref:F16"]
    _loads(store.get("own").file)


def test_a_moved_store_finds_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mistral_gguf_f16: Path
) -> None:
    import shutil

    _two_models(tiny_mistral_gguf_f16, tmp_path / "a", monkeypatch)
    shutil.move(tmp_path / "a", tmp_path / "moved")
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "moved"))
    model = store.get("own")
    assert model.file == tmp_path / "moved" / "models" / "own" / "F16.gguf"
    _loads(model.file)


def test_an_owned_file_of_another_store_is_never_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mistral_gguf_f16: Path
) -> None:
    """A version-1 manifest copied without its file points at the original's: rm keeps that."""
    import shutil

    original = tmp_path / "a"
    own, _ = _two_models(tiny_mistral_gguf_f16, original, monkeypatch)
    _as_version_1(original)
    shutil.copytree(original / "manifests", tmp_path / "b" / "manifests")
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "b"))
    assert store.get("own").file == own and not store.get("own").owned
    store.remove("own")
    assert own.exists()


def test_two_names_that_share_a_folder_never_overwrite_each_other(tmp_path: Path) -> None:
    from localmix.errors import UsageError

    first = tmp_path / "a.gguf"
    first.write_bytes(b"GGUF" + b"\0" * 100)
    store.add(_manifest("a/b", "Q4_K_M", first))
    store.add(_manifest("a/b", "Q8_0", first))  # the same name: another quant is welcome
    with pytest.raises(UsageError, match="'a-b' would share its store folder with 'a/b'"):
        store.add(_manifest("a-b", "Q4_K_M", first))
    assert sorted(m.ref for m in store.list_models()) == ["a/b:Q4_K_M", "a/b:Q8_0"]


def test_du_counts_a_models_importance_matrix_as_owned(tmp_path: Path) -> None:
    src = tmp_path / "x.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 100)
    store.add(_manifest("m", "Q4_K_M", src), src=src)
    before = store.du().owned_bytes
    store.imatrix_path("m").write_bytes(b"\0" * 1000)
    usage = store.du()
    assert ("m imatrix", 1000, True) in usage.models
    assert usage.owned_bytes == before + 1000

"""The text eval and imatrix run on: the shipped default and a user's file."""

from __future__ import annotations

import pytest

from localmix import corpus
from localmix.errors import UsageError


def test_default_ships_with_the_package_and_names_its_source() -> None:
    text = corpus.default()
    assert text.name == "langref" and text.license == "PSF-2.0"
    assert 200_000 < len(text.text.encode()) <= 256 * 1024
    assert text.text.startswith('The "assert" statement')
    assert "\x00" not in text.text


def test_default_is_whole_topics_from_pydoc() -> None:
    # Rebuilt on this Python, the first topics agree with the shipped copy (later ones may differ
    # between Python versions, which is why a copy ships).
    rebuilt = corpus.build_default(limit=4096)
    assert rebuilt and corpus.default().text.startswith(rebuilt[:2000])
    assert len(rebuilt.encode()) <= 4096


def test_a_user_file_is_read_as_utf8(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("Ünïcode text\n", encoding="utf-8")
    text = corpus.read(path)
    assert (text.name, text.text, text.license) == ("notes.txt", "Ünïcode text\n", None)
    assert corpus.read(None).name == "langref"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"  \n\t", "is empty"),
        (b"abc\x00def", "NUL bytes"),
        (b"\xff\xfe\x00a", "NUL bytes"),
        (b"caf\xe9", "not UTF-8 text (byte 3)"),
    ],
)
def test_bad_text_files_are_one_usage_error(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        corpus.read(path)


def test_missing_and_directory_paths(tmp_path) -> None:
    with pytest.raises(UsageError, match="no such text file"):
        corpus.read(tmp_path / "nope.txt")
    with pytest.raises(UsageError, match="is a directory"):
        corpus.read(tmp_path)

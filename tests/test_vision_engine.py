"""Images through localmix's own prompt and engine (llama/vision.py, Engine.stream with image
spans) against llama.cpp's own multimodal path (mtmd_tokenize + mtmd_helper_eval_chunks) on the
tiny text model and pixtral mmproj of test_vision_encoder: the same logits after the prompt; a
different image gives other logits; the cache is reused up to an image only when it is the same
image (two images of one size have the same token ids)."""

from __future__ import annotations

import ctypes
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localmix.chat import images, template
from localmix.chat.template import Message, Picture
from localmix.llama.engine import Engine
from localmix.llama.generation import Generation, ImageSpan
from localmix.llama.records import EngineConfig, Sampling, Stats

from .test_vision_encoder import mmprojs, text_gguf, text_model  # noqa: F401 (fixtures)

IMG = 10  # [IMG] in the tekken vocabulary
QUESTION = "What is this?"


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A PNG of seeded noise: every pixel and channel matters to the comparisons."""
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def noise_png(width: int, height: int, seed: int) -> images.Image:
    return images.decode(png_bytes(width, height, seed))


@pytest.fixture(scope="module")
def engine(text_gguf: Path, mmprojs: dict[str, Path]) -> Iterator[Engine]:  # noqa: F811
    with Engine(EngineConfig(text_gguf, n_ctx=512, n_threads=1)) as opened:
        opened.attach_vision(mmprojs["small3"])
        yield opened


def our_run(engine: Engine, picture: images.Image) -> tuple[np.ndarray, Stats, list[int]]:
    """The last prompt position's logits through localmix's prompt and engine, the Stats and
    the prompt."""
    vision = engine.vision
    assert vision is not None
    messages = [Message("user", (QUESTION, picture.picture()))]
    prompt = template.encode("v7", messages, engine.tokenize, images=vision.config)
    rows = vision.encode(picture)
    span = ImageSpan(prompt.index(IMG), len(rows), picture.key, rows)
    gen = Generation(prompt, Sampling(temperature=0.0), max_tokens=1, images=(span,))
    stats = next(item for item in engine.generate(gen) if isinstance(item, Stats))
    return np.array(engine.logits_at(-1), copy=True), stats, prompt


def mtmd_run(text: Path, mmproj: Path, picture: images.Image) -> tuple[np.ndarray, int]:
    """The same conversation through llama.cpp's own multimodal path: mtmd tokenizes the text
    around the image (BOS, [INST], the image, [IMG_END] and the text) and evaluates it; the last
    position's logits and the positions it filled."""
    import llama_cpp.mtmd_cpp as mtmd

    with Engine(EngineConfig(text, n_ctx=512, n_threads=1)) as other:
        vision = other.attach_vision(mmproj)
        size = (picture.width, picture.height)
        assert vision.config.pixels(*size) == size  # mtmd keeps it as it is
        chunks = mtmd.mtmd_input_chunks_init()
        pixels = (ctypes.c_uint8 * len(picture.rgb)).from_buffer_copy(picture.rgb)
        bitmap = mtmd.mtmd_bitmap_init(picture.width, picture.height, pixels)
        try:
            # mistral-common puts the image first: [INST] image [IMG_END]What is this?[/INST]
            body = b"[INST]" + mtmd.mtmd_default_marker() + QUESTION.encode() + b"[/INST]"
            text_in = mtmd.mtmd_input_text(body, len(body), True, True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            ctx: Any = vision._ctx
            assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text_in), bitmaps, 1) == 0
            n_past = other.lib.llama_pos(0)
            done = mtmd.mtmd_helper_eval_chunks(
                ctx, other.context, chunks, 0, 0, 512, True, ctypes.byref(n_past)
            )
            assert done == 0
            return np.array(other.logits_at(-1), copy=True), n_past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)


@pytest.mark.usefixtures("text_model")
def test_logits_equal_llama_cpps_own_multimodal_path(
    engine: Engine,
    text_gguf: Path,  # noqa: F811
    mmprojs: dict[str, Path],  # noqa: F811
) -> None:
    picture = noise_png(112, 56, seed=1)  # a 4x2 grid: mtmd keeps the size as it is
    engine.clear()
    ours, _, prompt = our_run(engine, picture)
    theirs, n_positions = mtmd_run(text_gguf, mmprojs["small3"], picture)
    assert n_positions == len(prompt)  # the same positions: BOS, [INST], 9 embeddings, ...
    if not np.isfinite(theirs).all():
        pytest.skip("llama.cpp's own path hit its uninitialised [IMG_BREAK] row this time")
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)
    assert int(ours.argmax()) == int(theirs.argmax())
    other, _, _ = our_run(engine, noise_png(112, 56, seed=2))
    assert np.abs(other - ours).max() > 1e-2  # the image matters to the logits


def test_the_cache_is_reused_up_to_an_image_only_when_it_is_the_same(engine: Engine) -> None:
    picture = noise_png(112, 56, seed=3)
    engine.clear()
    first, stats, prompt = our_run(engine, picture)
    assert stats.cached_tokens == 0
    again, stats, _ = our_run(engine, picture)  # the same image: all but the last token reused
    assert stats.cached_tokens == len(prompt) - 1
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-5)
    _, stats, _ = our_run(engine, noise_png(112, 56, seed=4))  # same size, other pixels
    assert stats.cached_tokens == prompt.index(IMG)  # BOS, [INST]: it stops where the image starts


def test_a_bad_image_span_is_refused(engine: Engine) -> None:
    from localmix.errors import UsageError

    prompt = [1, 3, IMG, IMG, 13, 4]
    on_last = ImageSpan(5, 1, "k", np.zeros((1, engine.n_embd), dtype=np.float32))
    with pytest.raises(UsageError, match="image spans"):
        list(engine.generate(Generation(prompt, max_tokens=1, images=(on_last,))))
    assert Picture(1, 1).width == 1


# -- a conversation with images: Session, and `localmix chat --image` --------------------------


def write_png(path: Path, width: int, height: int, seed: int) -> Path:
    path.write_bytes(png_bytes(width, height, seed))
    return path


def test_a_session_sees_an_image_and_keeps_it_across_turns(engine: Engine) -> None:
    from localmix.chat.session import Session

    engine.clear()
    session = Session(engine, "v7", sampling=Sampling(temperature=0.0), max_tokens=4)
    assert session.profile.sees_images
    picture = noise_png(112, 56, seed=5)
    encoded: list[str] = []
    vision = engine.vision
    assert vision is not None
    real = vision.encode

    def counting(image: images.Image) -> np.ndarray:
        encoded.append(image.key)
        return real(image)

    vision.encode = counting  # type: ignore[method-assign]
    try:
        first = next(i for i in session.send("What is this?", [picture]) if isinstance(i, Stats))
        second = next(i for i in session.send("And its colour?") if isinstance(i, Stats))
    finally:
        vision.encode = real  # type: ignore[method-assign]
    assert encoded == [picture.key]  # the second turn found the image in the cache
    assert first.image_s > 0 and second.image_s == 0
    assert second.cached_tokens > first.prompt_tokens  # the whole first turn was reused
    content = session.messages[0].content
    assert isinstance(content, tuple) and content[1] == picture.picture()


def test_chat_image_one_shot(
    tmp_path: Path,
    text_gguf: Path,  # noqa: F811
    mmprojs: dict[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from .cli_run import run_cli

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no piped input: the prompt is given
    photo = write_png(tmp_path / "photo.png", 84, 56, seed=6)
    base = ["chat", str(text_gguf), "What is in this?", "--format", "v7", "-n", "3",
            "--temperature", "0", "--json"]  # fmt: skip
    done = run_cli(capsys, *base, "--image", str(photo), "--mmproj", str(mmprojs["small3"]))
    assert done.code == 0, done.err
    import json

    assert json.loads(done.out)["stats"]["generated_tokens"] >= 1
    blind = run_cli(capsys, *base, "--image", str(photo))
    assert blind.code == 2 and "does not see images" in blind.err
    missing = run_cli(capsys, *base, "--image", str(tmp_path / "none.png"))
    assert missing.code == 2 and "--image" in missing.err and "none.png" in missing.err
    not_image = run_cli(capsys, *base, "--image", __file__)
    assert not_image.code == 2 and "not an image" in not_image.err


def test_the_repl_attaches_images_and_saves_them_with_the_chat(
    engine: Engine, tmp_path: Path
) -> None:
    from localmix.chat.session import Session, images_folder

    from .test_repl import drive

    engine.clear()
    session = Session(engine, "v7", sampling=Sampling(temperature=0.0), max_tokens=2)
    photo = write_png(tmp_path / "photo.png", 56, 56, seed=7)
    pasted = write_png(tmp_path / "pasted.jpg.png", 28, 56, seed=8)
    saved = tmp_path / "chat.json"
    keys = f"/image {photo}\rWhat is this?\r'{pasted}'\rAnd this?\r/save {saved}\r"
    _, out = drive(session, keys)
    assert "attached photo.png (56x56)" in out and "attached pasted.jpg.png (28x56)" in out
    users = [m for m in session.messages if m.role == "user"]
    assert [len(u.content) for u in users] == [2, 2]  # each: its text, then its image
    assert sorted(p.name for p in images_folder(saved).iterdir()) == sorted(
        k.removeprefix("sha256:") + ".png" for k in session.images
    )
    again = Session(engine, "v7", max_tokens=2)
    again.load(saved)
    assert again.images.keys() == session.images.keys()
    assert all(again.images[k].rgb == session.images[k].rgb for k in session.images)


def test_a_text_models_repl_says_it_does_not_see_images(tmp_path: Path) -> None:
    from localmix.chat.session import Session

    from .scripted_gguf import write_scripted_gguf
    from .test_repl import drive

    model = write_scripted_gguf(tmp_path / "text.gguf", {})
    photo = write_png(tmp_path / "photo.png", 8, 8, seed=9)
    with Engine(EngineConfig(model, n_ctx=256, n_threads=1)) as text_engine:
        session = Session(text_engine, "v1", max_tokens=2)
        _, out = drive(session, f"/image {photo}\r")
    assert "does not see images" in out and session.messages == []


def test_an_imported_vision_model_keeps_its_mmproj(
    tmp_path: Path,
    text_gguf: Path,  # noqa: F811
    mmprojs: dict[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`import --mmproj`: the store keeps the vision tower with the model, `show` names it, and
    `chat NAME --image` sees without being told the mmproj again."""
    import json
    import sys

    from .cli_run import run_cli

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    imported = run_cli(capsys, "import", str(text_gguf), "--name", "tiny-vision", "--format",
                       "v7", "--mmproj", str(mmprojs["small3"]))  # fmt: skip
    assert imported.code == 0, imported.err
    shown = run_cli(capsys, "show", "tiny-vision")
    assert shown.code == 0 and "small3.gguf" in shown.out.replace("\n", "")
    photo = write_png(tmp_path / "photo.png", 56, 28, seed=10)
    done = run_cli(capsys, "chat", "tiny-vision", "What is it?", "--image", str(photo), "-n",
                   "2", "--json")  # fmt: skip
    assert done.code == 0, done.err
    assert json.loads(done.out)["stats"]["image_s"] > 0
    wrong = run_cli(capsys, "import", str(text_gguf), "--name", "x", "--mmproj", str(text_gguf))
    assert wrong.code == 6 and "not an mmproj" in wrong.err

"""A real `localmix serve` for tests: a store of tiny models in its own LOCALMIX_HOME and a server
on 127.0.0.1 (a free port) in a background thread of the test process, for the real openai and
ollama clients to talk to."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from localmix.load import LoadSettings
from localmix.serve.guard import Policy
from localmix.serve.models import ServeOptions
from localmix.serve.server import Server

from .scripted_gguf import write_scripted_gguf

BOS, EOS = 1, 2
HELLO, WORLD, BANG = 22557, 1526, 28808  # ▁Hello, ▁world, !
CLOSE_INST = 28793  # "]": the last token of a v1 chat prompt ("▁[/INST]" is ▁[ / INST ])
LOOP = (100, 101)  # after a prompt ending in 100: 101 100 101 ... until a limit


def scripted_chat_gguf(path: Path, n_ctx: int = 512) -> Path:
    """A v1-vocabulary model whose greedy reply to any chat prompt is "Hello world!" then EOS,
    and which after token 100 repeats 101 100 101 ... forever."""
    successors = {CLOSE_INST: HELLO, HELLO: WORLD, WORLD: BANG, BANG: EOS}
    successors.update({LOOP[0]: LOOP[1], LOOP[1]: LOOP[0]})
    return write_scripted_gguf(path, successors, n_ctx=n_ctx)


@pytest.fixture(autouse=True)
def shared_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A serve test module's tests share its one store, `home` (the module's own fixture): the
    server reads LOCALMIX_HOME per request. Import it into the module to use it."""
    monkeypatch.setenv("LOCALMIX_HOME", str(home))
    return home


def make_store(home: Path, models: dict[str, Path], formats: dict[str, str] | None = None) -> Path:
    """Import each GGUF (by reference) under its name into the store at home, with chat format
    v1 unless formats names another."""
    from localmix.models.pull import import_gguf

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALMIX_HOME", str(home))
        for name, path in models.items():
            import_gguf(path, name=name, chat_format=(formats or {}).get(name, "v1"))
    return home


@contextlib.contextmanager
def serving(
    home: Path,
    *,
    ctx: int = 512,
    named: dict[str, Path] | None = None,
    policy: Policy | None = None,
    **options: object,
) -> Iterator[Server]:
    """A started server over the store at home (one thread: the machine running tests is
    small); stopped, with its models unloaded, on leaving."""
    from localmix import load

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALMIX_HOME", str(home))
        named_models = [(name, load.locate(path)) for name, path in (named or {}).items()]
        server = Server(
            LoadSettings(ctx=ctx, threads=1),
            ServeOptions(**options),  # type: ignore[arg-type]
            named=named_models,
            port=0,
            policy=policy,
        ).start()
    try:
        yield server
    finally:
        server.stop()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll check until it holds (True) or timeout seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()

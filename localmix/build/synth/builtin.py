"""The built-in synthetic models (`tiny-mistral`, `tiny-mixtral`): built locally, offline, in
seconds: synth checkpoint -> convert (f16) -> quantize -> store. A rebuild reuses what exists."""

from __future__ import annotations

from localmix import settings
from localmix.errors import UsageError
from localmix.models.store import Manifest
from localmix.progress import OnProgress, Progress, ignore

_TOKENIZER_FOR_FORMAT = {"v1": "v1", "v2": "v1", "v3": "v3", "v3-tekken": "tekken", "v7": "v3"}


def build(
    name: str,
    quant: str = "Q4_K_M",
    *,
    threads: int | None = None,
    on_progress: OnProgress = ignore,
) -> Manifest:
    """Build (or reuse) a synthetic catalog model at a quant and return its manifest.

    on_progress hears the stages: synth, convert, quantize (each with its tensors), register; a
    stage whose result exists already is announced once with reused=True."""
    from localmix import gguffile
    from localmix.build import quantize
    from localmix.build.convert import convert
    from localmix.build.synth import checkpoints as synth
    from localmix.models import catalog, store

    spec = catalog.load().get(name)
    if not spec.synthetic:
        raise UsageError(f"{spec.name} is not a built-in synthetic model", hint="pull it instead")
    existing = [m for m in store.find(spec.name) if m.quant == quant.upper()]
    if existing:
        on_progress(Progress("register", subject=existing[0].ref, reused=True))
        return existing[0]
    with store.lock(f"build-{spec.name}"):
        ckpt = settings.synth_dir() / spec.name
        if (ckpt / ".complete").exists():
            on_progress(Progress("synth", subject=str(ckpt), reused=True))
        else:
            on_progress(Progress("synth", subject=f"{spec.architecture} {spec.synthetic}"))
            synth.checkpoint(
                ckpt,
                arch=spec.architecture,
                size=spec.synthetic,
                tokenizer=_TOKENIZER_FOR_FORMAT[spec.chat_format],
                seed=0,
            )
            (ckpt / ".complete").write_text("ok\n")
        with store.tmp_file() as f16, store.tmp_file() as quantized:
            convert(ckpt, f16, outtype="f16", progress=on_progress)
            quantize.quantize(f16, quantized, quant, threads=threads, progress=on_progress)
            info = gguffile.inspect(quantized)
            on_progress(Progress("register", subject=f"{spec.name}:{quant.upper()}"))
            manifest = store.manifest_of(
                quantized,
                info,
                name=spec.name,
                chat_format=spec.chat_format,
                source=f"synth:{spec.name}",
                owned=True,
            )
            return store.add(manifest, src=quantized)

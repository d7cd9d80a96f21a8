"""g3n-convert: compile a Gemma 3n checkpoint into LiteRT bundles."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click

from converter.errors import G3nError

EPILOG = """\b
Examples:
  g3n-convert --checkpoint ./gemma-3n-E2B-it --out ./e2b-bundle
  g3n-convert --variant e2b --random-weights --out ./e2b-random
  g3n-convert verify ./e2b-bundle
"""


def _parse_lengths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("use comma-separated integers, e.g. 32,128") from None
    if not lengths or any(n < 1 for n in lengths):
        raise click.BadParameter("give at least one positive length")
    return lengths


def _parse_bundles(ctx, param, value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def quiet_libraries(verbose: bool) -> None:
    """Keep the terminal for g3n's own progress unless --verbose: litert-torch's task log,
    the converter's C++ INFO lines and torch's import-time notices."""
    import logging

    if verbose:
        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "y")
        return
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("torch.utils._pytree", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _fail(message: str, code: int = 1):
    click.echo(f"g3n-convert: error: {message}", err=True)
    sys.exit(code)


class _StageDisplay:
    """One line per stage with its elapsed time; a live spinner when stderr is a terminal."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet)
        self.status = None
        self.current = None
        self.started = 0.0

    def __call__(self, stage: str) -> None:
        self._finish()
        self.current, self.started = stage, time.perf_counter()
        if self.console.is_terminal:
            self.status = self.console.status(f"{stage} ...")
            self.status.start()

    def _finish(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        if self.current is not None:
            self.console.print(f"[green]done[/green] {self.current} [dim]({time.perf_counter() - self.started:.1f}s)[/dim]")
            self.current = None

    def close(self, ok: bool) -> None:
        if ok:
            self._finish()
        elif self.status is not None:
            self.status.stop()


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Hugging Face Gemma 3n folder (config.json, *.safetensors, tokenizer.model).")
@click.option("--random-weights", is_flag=True, help="Use seeded random weights at the variant's real shapes (for size, memory and speed work).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-weights.")
@click.option("--variant", type=click.Choice(["tiny", "e2b", "e4b"]), default=None, help="Model size. With --checkpoint it is checked against config.json; with --random-weights it defaults to e2b.")
@click.option("--quant", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True, help="Weight quantization of the bundles.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder for the bundles  [default: ./g3n-<variant>]")
@click.option("--prefill-lengths", default="32,128", show_default=True, callback=_parse_lengths, help="Comma-separated prefill signature lengths (prefill_<N>).")
@click.option("--cache-length", type=click.IntRange(min=2), default=1024, show_default=True, help="KV cache length: the longest context the bundle can hold.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="SentencePiece tokenizer.model to bundle (default: the checkpoint's).")
@click.option("--bundles", default="embedder,ple,text_core", show_default=True, callback=_parse_bundles, help="Which bundles to build.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("-v", "--verbose", is_flag=True, help="Also show litert-torch's own conversion log.")
@click.pass_context
def main(ctx, checkpoint, random_weights, seed, variant, quant, out, prefill_lengths, cache_length, tokenizer, bundles, as_json, quiet, verbose):
    """Compile a Gemma 3n checkpoint into LiteRT bundles for phones.

    Writes text_core.tflite (prefill_<N> / decode signatures with an explicit KV cache),
    embedder.tflite, ple.tflite, tokenizer.model and manifest.json (sizes, sha256, signatures)
    into --out. Every file is written atomically; manifest.json is written last.
    """
    if ctx.invoked_subcommand is not None:
        return
    from converter.pipeline import ConvertOptions, convert

    quiet_libraries(verbose)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    name = variant or ("e2b" if checkpoint is None else Path(checkpoint).name)
    opts = ConvertOptions(
        out=out or Path(f"g3n-{name}"),
        variant=variant,
        checkpoint=checkpoint,
        random_weights=random_weights,
        seed=seed,
        quant=quant,
        prefill_lengths=prefill_lengths,
        cache_length=cache_length,
        tokenizer=tokenizer,
        bundles=bundles,
    )
    display = _StageDisplay(quiet=quiet or as_json)
    ok = False
    try:
        manifest = convert(opts, on_stage=display)
        ok = True
    except G3nError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; no partial file was left under a final name and the folder has no manifest", 130)
    except MemoryError:
        _fail("out of memory; convert fewer bundles at once (--bundles) or use a machine with more RAM")
    finally:
        display.close(ok)

    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    click.echo(f"\nWrote {opts.out}/ ({manifest['variant']}, {manifest['conversion_seconds']}s)")
    for entry in [*manifest["bundles"].values(), *manifest["files"].values()]:
        click.echo(f"  {entry['file']:<20} {entry['bytes'] / 1e6:>10.2f} MB  sha256 {entry['sha256'][:16]}...")
    click.echo(f"Check it any time with: g3n-convert verify {opts.out}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--fast", is_flag=True, help="Check sizes only, skip sha256.")
def verify(folder, fast):
    """Re-check every file of a bundle folder against its manifest (size and sha256)."""
    from converter.bundle import listed_files, read_manifest, verify_bundle

    try:
        problems = verify_bundle(folder, check_hashes=not fast)
        count = len(listed_files(read_manifest(folder)))
    except G3nError as exc:
        _fail(str(exc))
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        _fail(f"{len(problems)} of {count} files do not match {folder}/manifest.json")
    click.echo(f"OK {count} files match {folder}/manifest.json")


if __name__ == "__main__":
    main()

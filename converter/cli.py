"""g3n-convert: compile a Gemma 3n checkpoint into LiteRT bundles."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from bundle import names
from bundle.errors import G3nError
from bundle.native_logs import native_stderr_to_devnull, quiet_native_teardown
from quant.recipes import BLOCK_SIZES, SCHEMES

EPILOG = """\b
Examples:
  g3n-convert --checkpoint ./gemma-3n-E2B-it --out ./e2b-bundle
  g3n-convert --checkpoint ./gemma-3n-E2B-it --quant int4 --out ./e2b-int4
  g3n-convert --variant e2b --random-weights --out ./e2b-random
  g3n-convert --checkpoint ./gemma-3n-E2B-it --quant int4 --format litertlm --out ./e2b
  g3n-convert pack ./e2b-int4 --out ./e2b-int4.litertlm
  g3n-convert matformer list
  g3n-convert --checkpoint ./gemma-3n-E4B-it --matformer e2.98b-block-level --quant int4 --out ./e2.98b
  g3n-convert slice --checkpoint ./gemma-3n-E4B-it --matformer official-e2b-model --out ./gemma-3n-E2B-sliced
  g3n-convert verify ./e2b-bundle
  g3n-convert verify ./e2b-int4.litertlm
"""


def _parse_lengths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("use comma-separated integers, e.g. 32,128") from None
    if not lengths or any(n < 1 for n in lengths):
        raise click.BadParameter("give at least one positive length")
    return lengths


def _parse_spans(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None  # the default ladder
    if value.strip().lower() == "none":
        return ()
    return _parse_lengths(ctx, param, value)


def _parse_bundles(ctx, param, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def native_logs_silenced(enabled: bool):
    """The converter's C++ side (MLIR export, the LiteRT runtime it folds constants with) logs
    INFO lines straight to file descriptor 2; while converting only that noise is dropped, and
    g3n's own output still shows. -v keeps everything."""
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False  # stderr captured in-process (click's CliRunner): leave it alone
    return native_stderr_to_devnull(keep_python_stderr=True) if enabled and real else contextlib.nullcontext()


def quiet_libraries(verbose: bool) -> None:
    """Keep the terminal for g3n's own progress unless --verbose: litert-torch's task log,
    the converter's C++ INFO lines and torch's import-time notices."""
    import logging

    if verbose:
        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "y")
        return
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TQDM_DISABLE", "1")  # ai-edge-quantizer's own progress bars
    for name in ("torch.utils._pytree", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


_interrupted = False


def _raise_keyboard_interrupt(signum, frame):
    # Native code (MLIR, LiteRT) can swallow the exception when the signal lands in a callback it
    # runs; the flag makes the next stage boundary raise it again.
    global _interrupted
    _interrupted = True
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
        if _interrupted:
            raise KeyboardInterrupt
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
@click.option("--quant", type=click.Choice(SCHEMES), default="none", show_default=True, help="Weight quantization: int8 per-channel, or int4 blockwise for the text core and embedding tables (encoders get int8).")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default="32", show_default=True, help="int4 block size along each weight's input dimension.")
@click.option("--quant-text", type=click.Choice(SCHEMES), default=None, help="Override --quant for text_core.")
@click.option("--quant-embed", type=click.Choice(SCHEMES), default=None, help="Override --quant for the token embedder.")
@click.option("--quant-ple", type=click.Choice(SCHEMES), default=None, help="Override --quant for the per-layer-embedding table.")
@click.option("--quant-vision", type=click.Choice(SCHEMES), default=None, help="Override --quant for the vision encoder (default int8 when --quant int4).")
@click.option("--quant-audio", type=click.Choice(SCHEMES), default=None, help="Override --quant for the audio encoder and its adapter (default int8 when --quant int4).")
@click.option("--strict", is_flag=True, help="Fail (no manifest) when quantized quality falls below its threshold, instead of warning.")
@click.option("--no-quality-report", "skip_quality", is_flag=True, help="Skip scoring quantized bundles against the float ones (saves time at real size).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder for the bundles  [default: ./g3n-<variant>]")
@click.option("--prefill-lengths", default="32,128", show_default=True, callback=_parse_lengths, help="Comma-separated prefill signature lengths (prefill_<N>).")
@click.option("--cache-length", type=click.IntRange(min=2), default=1024, show_default=True, help="KV cache length: the longest context the bundle can hold.")
@click.option("--context-spans", default=None, callback=_parse_spans, metavar="LIST|none", help="Context buckets of the text core: extra signatures that attend over the cache's first N positions only, which g3n-run picks while the conversation is shorter, so a long cache costs what the context in use costs  [default: 1024 doubling below --cache-length; none: only the full-cache signatures]")
@click.option("--sliding-ring/--no-sliding-ring", default=True, show_default=True, help="Keep each sliding-window layer's KV cache as a ring of window + longest prefill - 1 positions instead of --cache-length (less memory, and those layers attend over the ring only).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="SentencePiece tokenizer.model to bundle (default: the checkpoint's).")
@click.option("--bundles", default=None, callback=_parse_bundles, help="Comma-separated bundles to build, from embedder, ple, text_core, vision_encoder, audio_encoder (an encoder brings its companions: end_of_vision; audio_adapter and end_of_audio)  [default: all the checkpoint has]")
@click.option("--matformer", default=None, metavar="NAME_OR_FILE", help="Slice E4B to a MatFormer Mix-n-Match size on the fly: a published name (g3n-convert matformer list) or a JSON file with ffn_hidden_dims and layers_skipped.")
@click.option("--format", "out_format", type=click.Choice(["folder", "litertlm", "both"]), default="folder", show_default=True, help="folder: loose .tflite bundles and manifest.json; litertlm: one <out>/<name>.litertlm for LiteRT-LM (text, images and audio); both.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("-v", "--verbose", is_flag=True, help="Also show litert-torch's own conversion log.")
@click.pass_context
def main(ctx, checkpoint, random_weights, seed, variant, quant, block_size, quant_text, quant_embed, quant_ple,
         quant_vision, quant_audio, strict, skip_quality, out, prefill_lengths, cache_length, context_spans, sliding_ring, tokenizer, bundles, matformer, out_format, as_json, quiet, verbose):
    """Compile a Gemma 3n checkpoint into LiteRT bundles for phones.

    Writes text_core.tflite (prefill_<N> / decode signatures with an explicit KV cache),
    embedder.tflite, ple.tflite, tokenizer.model and manifest.json (sizes, sha256, signatures)
    into --out. Every file is written atomically; manifest.json is written last.
    """
    if ctx.invoked_subcommand is not None:
        return
    quiet_libraries(verbose)
    # Importing torch, litert-torch and LiteRT prints absl's pre-init warning, oneDNN's notice and
    # torch's pytree deprecation warnings; none of them is about the user's conversion.
    with contextlib.nullcontext() if verbose else native_stderr_to_devnull():
        from converter.pipeline import ConvertOptions, convert

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    name = variant or ("e2b" if checkpoint is None else Path(checkpoint).name)
    if matformer is not None:
        from converter.matformer import load_matformer

        try:
            name = f"{name}-{load_matformer(matformer).name}"
        except G3nError as exc:
            _fail(str(exc))
    out = out or Path(f"g3n-{name}")
    folder = out
    if out_format == "litertlm":  # the bundles are built in a hidden folder and packed
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail(f"cannot create {out}: {exc.strerror or exc}")
        staging = tempfile.TemporaryDirectory(prefix=".g3n-bundle-", dir=out)
        folder = Path(staging.name) / name
    opts = ConvertOptions(
        out=folder,
        variant=variant,
        checkpoint=checkpoint,
        random_weights=random_weights,
        seed=seed,
        quant=quant,
        quant_overrides={
            bundle: scheme
            for bundle, scheme in ((names.TEXT_CORE, quant_text), (names.EMBEDDER, quant_embed), (names.PLE, quant_ple),
                                   (names.VISION_ENCODER, quant_vision), (names.AUDIO_ENCODER, quant_audio))
            if scheme is not None
        },
        block_size=int(block_size),
        quality_report=not skip_quality,
        strict=strict,
        prefill_lengths=prefill_lengths,
        cache_length=cache_length,
        context_spans=context_spans,
        sliding_ring=sliding_ring,
        tokenizer=tokenizer,
        bundles=bundles,
        matformer=matformer,
    )
    display = _StageDisplay(quiet=quiet or as_json)
    ok = False
    try:
        with native_logs_silenced(not verbose):
            manifest = convert(opts, on_stage=display)
            if out_format != "folder":
                display("packing .litertlm")
                from converter.pack import pack

                packed = pack(folder, out / f"{name}.litertlm", verify="sizes")  # just written and hashed
        ok = True
    except G3nError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; no partial file was left under a final name and the folder has no manifest", 130)
    except MemoryError:
        _fail("out of memory; convert fewer bundles at once (--bundles) or use a machine with more RAM")
    finally:
        display.close(ok)

    if out_format == "litertlm":
        staging.cleanup()
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    elif out_format == "folder":
        print_summary(opts.out, manifest)
    else:
        if out_format == "both":
            print_summary(opts.out, manifest)
        click.echo(f"{packed} ({packed.stat().st_size / 1e6:,.2f} MB). Check it any time with: g3n-convert verify {packed}")
    if "quality" in manifest:  # the quality report ran LiteRT, which logs its teardown at exit
        quiet_native_teardown()


def print_summary(out: Path, manifest: dict) -> None:
    """The bundle table (size, scheme, bits per weight, quality), then any quality warnings."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title=f"{out}/ ({manifest['variant']}, {manifest['conversion_seconds']}s)", title_justify="left")
    table.add_column("file")
    for column in ("MB", "scheme", "bits/weight", "cosine vs float"):
        table.add_column(column, justify="right")
    for entry in manifest["bundles"].values():
        quality = entry.get("quality", {})
        table.add_row(entry["file"], f"{entry['bytes'] / 1e6:.2f}", entry["quantization"]["scheme"],
                      f"{entry['bits_per_weight']:.2f}", f"{quality['cosine']:.5f}" if "cosine" in quality else "-")
    for entry in manifest["files"].values():
        table.add_row(entry["file"], f"{entry['bytes'] / 1e6:.2f}", "", "", "")
    console.print(table)
    report = manifest.get("quality")
    if report and report.get("text_path"):
        path = report["text_path"]
        console.print(
            f"Text path vs float over {report['prompts']}: top-1 agreement {path['top1_agreement']:.1%}, "
            f"mean KL {path['mean_kl']:.4f} nats, logits cosine {path['logits_cosine']:.5f}"
        )
    for name, reason in (report or {}).get("not_scored", {}).items():
        console.print(f"Not scored: {name}: {reason}")
    for warning in (report or {}).get("warnings", []):
        Console(stderr=True, highlight=False).print(f"[bold red]WARNING: quantized quality below threshold:[/] {warning}")
    console.print(f"Check it any time with: g3n-convert verify {out}")


@main.command()
@click.argument("target", metavar="FOLDER_OR_FILE", type=click.Path(path_type=Path))
@click.option("--fast", is_flag=True, help="Check sizes only, skip sha256.")
def verify(target, fast):
    """Re-check a bundle folder against its manifest.json, or every section of a .litertlm
    against the g3n manifest it carries (size and sha256)."""
    from bundle.litertlm import is_litertlm, verify_litertlm
    from bundle.manifest import read_manifest, verify_bundle

    try:
        if is_litertlm(target):
            packed, problems = verify_litertlm(target)
            count, what, against = len(packed.sections), "sections", f"the g3n manifest in {target}"
        else:
            manifest = read_manifest(target)
            problems = verify_bundle(target, check_hashes=not fast, manifest=manifest)
            count, what, against = len(manifest.listed_files()), "files", f"{target}/manifest.json"
    except G3nError as exc:
        _fail(str(exc))
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        _fail(f"{len(problems)} of {count} {what} do not match {against}")
    click.echo(f"OK {count} {what} match {against}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="The .litertlm to write  [default: FOLDER.litertlm]")
def pack(folder, out):
    """Pack a bundle folder into one .litertlm for LiteRT-LM (Android apps, its C++ / Kotlin API).

    Every file is checked against the folder's manifest (size and sha256) first; the folder's
    manifest travels inside the file, so `g3n-convert verify FILE.litertlm` can check it later.
    """
    with native_stderr_to_devnull():
        from converter.pack import pack as pack_folder
    out = out or Path(f"{Path(folder).resolve()}.litertlm")
    try:
        written = pack_folder(folder, out)
    except G3nError as exc:
        _fail(str(exc))
    click.echo(f"{written} ({written.stat().st_size / 1e6:,.2f} MB). Check it any time with: g3n-convert verify {written}")


@main.group()
def matformer():
    """MatFormer Mix-n-Match: the smaller models nested inside E4B."""


@matformer.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def matformer_list(as_json):
    """The 16 published configurations of E4B (Google's gemma3n-slicing-configs table): layers
    kept and skipped, effective parameters as g3n counts them (next to the published figure),
    pre-trained MMLU and the int4 folder's estimated size (weights; every bundle, encoders included).

    Pass a name to --matformer, or write your own JSON file:
    {"ffn_hidden_dims": [one width per kept layer], "layers_skipped": [layer indices]}.
    """
    with native_stderr_to_devnull():
        from converter.matformer import layer_ranges, published_table

        rows = published_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    # Plain columns: the names must show whole, and rich would fold them at 80 columns.
    click.echo(f"{'name':<20} {'layers':>6}  {'skipped':<8} {'FFN 8192/16384':>14}  {'effective (g3n)':>15}  "
               f"{'published':>9}  {'MMLU PT':>7}  {'int4 folder':>11}")
    for row in rows:
        widths = row["ffn_hidden_dims"]
        click.echo(f"{row['name']:<20} {row['layers_kept']:>6}  {layer_ranges(row['layers_skipped']) or '-':<8} "
                   f"{f'{widths.count(8192)}/{widths.count(16384)}':>14}  {row['effective_parameters'] / 1e9:>13.3f} B  "
                   f"{row['published_effective_b']:>7.2f} B  {row['mmlu_pt_percent']:>6.1f}%  "
                   f"{row['estimated_int4_folder_bytes'] / 1e9:>8.2f} GB")
    click.echo("effective: the text decoder without its embedding tables (embed_tokens, PLE) or encoders; "
               "int4 folder: estimated weight bytes of every bundle, encoders included")


@main.command("slice")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="The Hugging Face Gemma 3n folder to slice (E4B for the published configurations).")
@click.option("--matformer", required=True, metavar="NAME_OR_FILE", help="A published name (g3n-convert matformer list) or a JSON file with ffn_hidden_dims and layers_skipped.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The folder to write (new or empty).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def slice_command(checkpoint, matformer, out, quiet):
    """Write a MatFormer slice as a Hugging Face checkpoint (safetensors shards + index,
    config.json, the tokenizer files) that transformers loads as a smaller Gemma 3n.

    Streamed a block of rows at a time: the source is never held in memory. The folder appears
    under its name only when it is complete.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with native_stderr_to_devnull():
        from converter.hf_slice import slice_checkpoint
    progress = Progress("slicing", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                        disable=quiet, transient=True)
    task = progress.add_task("slice", total=None)
    try:
        with progress:
            summary = slice_checkpoint(checkpoint, matformer, out,
                                       on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    except G3nError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was left under the output name", 130)
    mf = summary["matformer"]
    click.echo(f"{out}: {mf['name']}, {mf['layers_kept']} of {mf['source_layers']} layers, "
               f"{mf['effective_parameters'] / 1e9:.3f} B effective parameters; {summary['tensors']} tensors, "
               f"{summary['bytes'] / 1e9:.2f} GB in {len(summary['shards'])} shard(s)")


if __name__ == "__main__":
    main()

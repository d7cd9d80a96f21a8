"""g3n-run: chat with a g3n bundle folder on the CPU with LiteRT."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from bundle.errors import G3nError
from bundle.native_logs import quiet_native_teardown

EPILOG = """\b
Examples:
  g3n-run ./e2b-int4 --prompt "Why is the sky blue?"
  g3n-run ./e2b-int4 --prompt "Once upon a time" --raw --temperature 0.8 --top-p 0.95 --seed 1
  g3n-run ./e2b-int4 --prompt "Hi" --json --stats
  g3n-run ./e2b-int4                      (interactive chat; /reset starts over, /exit or Ctrl-D leaves)
"""


def _fail(message: str, code: int = 1):
    click.echo(f"g3n-run: error: {message}", err=True)
    quiet_native_teardown()
    sys.exit(code)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _print_stats(stats: dict, loaded: list[str]) -> None:
    rate, prefill = stats["decode_tokens_per_second"], stats["prefill_tokens_per_second"]
    click.echo(
        f"[load {stats['load_seconds']:.2f}s (weight cache {stats['weight_cache']}) | {stats['prompt_tokens']} prompt tokens, "
        f"time to first token {stats['time_to_first_token_seconds']:.3f}s, "
        f"prefill {'-' if prefill is None else f'{prefill:.1f}'} tok/s | {stats['generated_tokens']} generated, "
        f"decode {'-' if rate is None else f'{rate:.1f}'} tok/s | peak RSS {stats['peak_rss_mib']:.0f} MiB | "
        f"context {stats['context_used']} | loaded: {', '.join(loaded)}]",
        err=True,
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="The user message. Without it, g3n-run opens an interactive chat.")
@click.option("--system", default=None, help="System instruction, placed before the first user message.")
@click.option("--image", type=click.Path(path_type=Path), default=None, help="An image for the prompt (needs a vision encoder bundle).")
@click.option("--audio", type=click.Path(path_type=Path), default=None, help="A WAV file for the prompt (needs an audio encoder bundle).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Most tokens to generate per reply.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Sample among the K most likely tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible replies).")
@click.option("--raw", is_flag=True, help="No chat template: the input is <bos> + the prompt's tokens.")
@click.option("--stats", is_flag=True, help="Print load time, time to first token, prefill / decode tok/s and peak RSS.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token_ids, loaded_bundles, stats) instead of streaming.")
@click.option("--verify", is_flag=True, help="Hash every file against manifest.json now, even those verified before.")
@click.option("--no-verify", is_flag=True, help="Check sizes only: skip the sha256 check of files not verified before (at your own risk).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for LiteRT (default: LiteRT's choice).")
@click.option("--weight-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for XNNPACK's packed-weight cache (default: $G3N_CACHE_DIR or ~/.cache/g3n). "
                   "The first load writes it; later loads map it: faster, and the weights are held once.")
@click.option("--no-weight-cache", is_flag=True, help="Pack the weights in memory on every load instead.")
def main(bundle, prompt, system, image, audio, max_new_tokens, temperature, top_k, top_p, seed, raw, stats, as_json, verify, no_verify,
         threads, weight_cache, no_weight_cache):
    """Generate text with a g3n bundle folder (text_core, embedder, ple, tokenizer.model;
    vision_encoder / audio_encoder for --image / --audio).

    Streams the reply as it is produced. Vision / audio encoders load only for prompts that
    carry an --image / --audio.
    """
    from runtime.sampling import SamplingConfig
    from runtime.session import Session

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if prompt is None and as_json:
        _fail("--json needs --prompt")
    try:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        cache_dir = None if no_weight_cache else (weight_cache or "default")
        if verify and no_verify:
            _fail("give --verify or --no-verify, not both")
        mode = "always" if verify else "sizes" if no_verify else "once"
        session = Session(bundle, verify=mode, num_threads=threads, weight_cache_dir=cache_dir)
        options = dict(max_new_tokens=max_new_tokens, sampling=sampling, raw=raw, system=system, image=image, audio=audio)
        if prompt is None:
            _interactive(session, options, stats)
        elif as_json:
            result = session.generate(prompt, **options)
            click.echo(json.dumps({
                "text": result.text,
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
                "loaded_bundles": session.loaded_bundles,
                "stats": result.stats,
            }, indent=2))
        else:
            _stream(session, prompt, options)
            if stats:
                _print_stats(session.last.stats, session.loaded_bundles)
    except G3nError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    quiet_native_teardown()


def _stream(session, prompt: str, options: dict) -> None:
    printed = ""
    for piece in session.stream(prompt, **options):
        click.echo(piece.text, nl=False)
        printed += piece.text
    click.echo(session.last.text[len(printed):])  # whatever an incomplete character held back


def _interactive(session, options: dict, stats: bool) -> None:
    from runtime.session import ContextFullError, MediaError

    click.echo(f"g3n-run: {session.folder} ({session.manifest.variant}, cache {session.cache_length} tokens). "
               "/image PATH or /audio PATH attaches a file to the next prompt, /reset starts over, "
               "/exit or Ctrl-D leaves.", err=True)
    # --image / --audio attach to the first prompt; media are per prompt, not per chat.
    pending = {"image": options["image"], "audio": options["audio"]}
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo()
            return
        command, _, argument = line.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            click.echo("(new conversation)", err=True)
            continue
        if command in ("/image", "/audio") and argument.strip():
            pending[command[1:]] = Path(argument.strip())
            click.echo(f"({command[1:]} {argument.strip()} goes with the next prompt)", err=True)
            continue
        if not line.strip():
            continue
        try:
            _stream(session, line, {**options, **pending})
        except (ContextFullError, MediaError) as exc:
            click.echo(f"g3n-run: {exc}", err=True)
            continue
        finally:
            pending = {"image": None, "audio": None}
        if stats:
            _print_stats(session.last.stats, session.loaded_bundles)


if __name__ == "__main__":
    main()

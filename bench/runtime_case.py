"""One g3n-run measurement in its own process: load a bundle folder, prefill a prompt of N random
token ids, decode M tokens greedily; prints the Session's stats as JSON (peak RSS from the caller)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.session import Session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backend", default="compiled", choices=["compiled", "interpreter"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    session = Session(args.folder, num_threads=args.threads, backend=args.backend)
    vocab = session.manifest["config"]["vocab_size_per_layer_input"]
    prompt = np.random.default_rng(0).integers(3, vocab, args.prompt_tokens).tolist()
    started = time.perf_counter()
    result = session.generate(prompt, max_new_tokens=args.new_tokens)
    stats = dict(result.stats, wall_seconds=round(time.perf_counter() - started, 3), backend=args.backend)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()

"""Run a .litertlm through LiteRT-LM's own Python engine (litert-lm-api) and print one JSON object.

  python -m tests.support.litertlm_probe FILE.litertlm SPEC.json

SPEC: {"raw": [prompt, ...], "score": [[prompt, target], ...], "chat": [turn, ...],
"media": [["image" | "audio", file, text], ...], "suppress": [token id, ...], "max_new_tokens": N}.
Output: {"raw": [text, ...], "score": [[token log-prob, ...], ...], "chat": [reply, ...],
"rendered": first turn as LiteRT-LM renders it, "media": [reply, ...]} (each media prompt a fresh
conversation, with the `suppress` ids never sampled).

Kept in its own process so LiteRT-LM's native library (liblitert-lm.so) never shares one with
ai-edge-litert's interpreter in the test run, and a native failure is a failed test, not a crash.
Greedy decoding: top_k 1.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import litert_lm

    path, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    greedy = litert_lm.SamplerConfig(top_k=1)
    new_tokens = spec.get("max_new_tokens", 8)
    out = {"raw": [], "score": [], "chat": [], "media": []}
    kinds = {kind for kind, _, _ in spec.get("media", [])}
    cpu = litert_lm.Backend.CPU(thread_count=2)
    backends = {f"{'vision' if kind == 'image' else kind}_backend": cpu for kind in kinds}
    engine = litert_lm.Engine(path, backend=cpu, cache_dir=":nocache", **backends)
    try:
        for prompt in spec.get("raw", []):
            session = engine.create_session(apply_prompt_template=False, sampler_config=greedy,
                                            max_output_tokens=new_tokens)
            session.run_prefill([prompt])
            out["raw"].append(session.run_decode().texts[0])
            session.close()
        for prompt, target in spec.get("score", []):
            session = engine.create_session(apply_prompt_template=False, sampler_config=greedy)
            session.run_prefill([prompt])
            out["score"].append(session.run_text_scoring([target]).token_scores[0])
            session.close()
        if spec.get("chat"):
            conversation = engine.create_conversation(sampler_config=greedy, max_output_tokens=new_tokens)
            out["rendered"] = conversation.render_message_to_string({"role": "user", "content": spec["chat"][0]})
            for turn in spec["chat"]:
                reply = conversation.send_message(turn)
                out["chat"].append("".join(part.text for part in reply.contents))
            conversation.close()
        suppress = litert_lm.SuppressTokensConfig(spec["suppress"]) if spec.get("suppress") else None
        for kind, file, text in spec.get("media", []):
            item = litert_lm.Content.ImageFile(file) if kind == "image" else litert_lm.Content.AudioFile(file)
            conversation = engine.create_conversation(sampler_config=greedy, max_output_tokens=new_tokens)
            reply = conversation.send_message(litert_lm.Contents.of(item, text), suppress_tokens_config=suppress)
            out["media"].append("".join(part.text for part in reply.contents))
            conversation.close()
    finally:
        engine.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

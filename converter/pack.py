"""Pack a verified bundle folder into one .litertlm file, the form LiteRT-LM's engine and the
Android apps built on it (AI Edge Gallery, LiteRT-LM's Kotlin / C++ API) load.

Sections, in LiteRT-LM's model types: text_core as `tf_lite_prefill_decode`, the token embedder
as `tf_lite_embedder`, the per-layer-embedding table as `tf_lite_per_layer_embedder`; when the
folder has them, the vision encoder as `tf_lite_vision_encoder` with `end_of_vision` as
`tf_lite_end_of_vision`, and the audio encoder, adapter and `end_of_audio` as
`tf_lite_audio_encoder_hw`, `tf_lite_audio_adapter` and `tf_lite_end_of_audio`; the SentencePiece
tokenizer; an LlmMetadata; and g3n's own manifest section (bundle/litertlm.py), which records each
section's sha256 so `g3n-convert verify FILE.litertlm` and a device can check the file.

The LlmMetadata declares a generic multimodal model rather than LiteRT-LM's Gemma3N type. The
Gemma3N type fixes LiteRT-LM's own log-mel front end (USM's: another window, filterbank, floor
and a per-bin normalisation than transformers' extractor) and leaves `<end_of_image>` out of the
prompt. The generic type lets the file say what transformers' Gemma3nProcessor does: hand the
audio encoder framed samples (skip_mel_spectrogram_extraction; g3n's encoder computes
transformers' log-mel in-graph), and lay media out as "\n\n<start_of_X>" + soft tokens +
<end_of_X> + "\n\n", the end embedding coming from the end_of_* section.

Every section is a byte-for-byte copy of a file the folder's manifest lists (or, for the two
metadata sections, bytes g3n writes here), so a section's sha256 is the file's.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from bundle import names
from bundle.errors import BundleError
from bundle.files import atomic_path, sha256_file
from bundle.litertlm import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, MANIFEST_ITEM, verify_litertlm
from bundle.manifest import Manifest, member_path, open_bundle

# LiteRT-LM's CPU executor looks tokens up one at a time through the FIRST signature of the
# embedder and per-layer-embedder models (it passes no signature name): g3n exports these
# single-token signatures first, and packing checks it.
SINGLE_TOKEN_SIGNATURES = {b: names.lookup_signature(b) for b in (names.EMBEDDER, names.PLE)}

# The Gemma chat format (the same turns Gemma 3n's chat template renders).
TURN_PREFIX = "<start_of_turn>{role}\n"
TURN_SUFFIX = "<end_of_turn>\n"

# Bundles packed as models, by LiteRT-LM model type (litert-lm-builder's TfLiteModelType), in
# section order. The vision encoder is one model, image [1,S,S,3] in [0,1] -> soft-token
# embeddings [1,N,H]: with no vision adapter, LiteRT-LM writes its output straight into
# `embeddings`. The audio encoder (framed samples -> features + mask) and adapter (-> embeddings)
# are LiteRT-LM's static (non-streaming) audio pair; LiteRT-LM keeps a clip's valid tokens only.
MODEL_SECTIONS = {
    names.TEXT_CORE: "PREFILL_DECODE",
    names.EMBEDDER: "EMBEDDER",
    names.PLE: "PER_LAYER_EMBEDDER",
    names.VISION_ENCODER: "VISION_ENCODER",
    names.END_OF_VISION: "END_OF_VISION",
    names.AUDIO_ENCODER: "AUDIO_ENCODER_HW",
    names.AUDIO_ADAPTER: "AUDIO_ADAPTER",
    names.END_OF_AUDIO: "END_OF_AUDIO",
}
MEDIA_AFFIX = "\n\n"  # before <start_of_X> and after <end_of_X>, as transformers' Gemma3nProcessor writes


def llm_metadata(manifest: Manifest, tokenizer: Path):
    """LiteRT-LM's LlmMetadata for a g3n bundle; `tokenizer` names the media marker pieces (LiteRT-LM
    takes media tokens as strings)."""
    import sentencepiece as spm
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    config = manifest.config
    metadata = llm_metadata_pb2.LlmMetadata()
    metadata.start_token.token_ids.ids.append(config["bos_token_id"])
    for token in config["eos_token_ids"]:
        metadata.stop_tokens.add().token_ids.ids.append(token)
    metadata.max_num_tokens = int(manifest.cache_length)  # the text core's static KV cache
    model = metadata.llm_model_type.generic_model
    model.SetInParent()
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    starts = []
    vision = manifest.encoders.get("vision")
    if vision is not None and vision.end_of_media is not None:
        model.image_enabled = True
        start = sp.id_to_piece(vision.start_token_id)
        model.start_of_image_token.token_str = start
        model.end_of_image_token.token_str = sp.id_to_piece(vision.end_token_id)
        model.image_token_regex = f"({re.escape(start)})"
        model.image_tensor_height = model.image_tensor_width = vision.image.size
        model.image_prefix = model.image_suffix = MEDIA_AFFIX
        model.add_image_end = True
        starts.append(start)
    audio = manifest.encoders.get("audio")
    if audio is not None and audio.adapter is not None and audio.end_of_media is not None:
        model.audio_enabled = True
        start = sp.id_to_piece(audio.start_token_id)
        model.start_of_audio_token.token_str = start
        model.end_of_audio_token.token_str = sp.id_to_piece(audio.end_token_id)
        model.audio_token_regex = f"({re.escape(start)})"
        model.skip_mel_spectrogram_extraction = True  # the encoder takes frames: transformers' log-mel in-graph
        model.audio_sample_rate_hz = audio.audio.sample_rate
        model.audio_frame_length = audio.audio.frame_length
        model.audio_hop_length = audio.audio.hop_length
        model.audio_prefix = model.audio_suffix = MEDIA_AFFIX
        model.add_audio_end = True
        starts.append(start)
    if starts:  # LiteRT-LM's template writes a media item as its start marker; the prompt is split there
        model.delimiter_regex = f"({'|'.join(re.escape(s) for s in starts)})"
    for role, template in (("user", metadata.prompt_templates.user), ("model", metadata.prompt_templates.model)):
        template.prefix = TURN_PREFIX.format(role=role)
        template.suffix = TURN_SUFFIX
    # The builder refuses an LLM without these two flags.
    metadata.supports_thinking = False
    metadata.supports_function_calling = False
    return metadata


def pack(bundle_dir: Path, out_file: Path, verify: str = "always") -> Path:
    """Write `out_file` (.litertlm) from the bundle folder `bundle_dir`, after checking every file
    against its manifest (`verify`: always / once / sizes, as for a runner). Atomic: the file
    appears complete or not at all."""
    from litert_lm_builder import litertlm_builder as lb

    bundle_dir, out_file = Path(bundle_dir), Path(out_file)
    if out_file.suffix != names.LITERTLM_SUFFIX:
        raise BundleError(f"{out_file}: a LiteRT-LM file must end in {names.LITERTLM_SUFFIX}")
    manifest = open_bundle(bundle_dir, verify=verify, needs=names.TEXT_BUNDLES)
    tokenizer = manifest.files.get(names.TOKENIZER)
    if tokenizer is None:
        raise BundleError(f"{bundle_dir} has no tokenizer in its manifest; convert it again with --tokenizer")
    for name, key in SINGLE_TOKEN_SIGNATURES.items():
        first = next(iter(manifest.bundles[name].signatures))
        if first != key:
            raise BundleError(f"{bundle_dir}/{manifest.bundles[name].file} starts with signature {first}; "
                              f"LiteRT-LM needs {key} first: convert the folder again with this g3n")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".g3n-pack-", dir=out_file.parent) as tmp:
        tmp = Path(tmp)
        metadata_path = tmp / "llm_metadata.pb"
        metadata_path.write_bytes(llm_metadata(manifest, member_path(bundle_dir, tokenizer)).SerializeToString())

        builder = lb.LitertLmFileBuilder()
        builder.add_system_metadata(lb.Metadata("Authors", "g3n-convert", lb.DType.STRING))
        builder.add_system_metadata(lb.Metadata("g3n_variant", manifest.variant, lb.DType.STRING))
        # (what the section holds, its model type, its source file), in the builder's section order
        planned = []
        for name, model_type in MODEL_SECTIONS.items():
            if name not in manifest.bundles:  # the text bundles are checked present above
                continue
            path = member_path(bundle_dir, manifest.bundles[name])
            model_type = getattr(lb.TfLiteModelType, model_type)
            builder.add_tflite_model(str(path), model_type)
            planned.append((name, model_type.value, path))
        tokenizer_path = member_path(bundle_dir, tokenizer)
        builder.add_sentencepiece_tokenizer(str(tokenizer_path))
        planned.append((names.TOKENIZER, None, tokenizer_path))
        builder.add_llm_metadata(str(metadata_path))
        planned.append(("llm_metadata", None, metadata_path))

        record = tmp / "g3n_manifest.json"
        record.write_bytes(json.dumps({
            "format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION,
            "manifest": manifest.to_dict(),
            "sections": [{"index": i, "holds": holds, "model_type": model_type, "bytes": path.stat().st_size,
                          "sha256": sha256_file(path)} for i, (holds, model_type, path) in enumerate(planned)],
        }, indent=1).encode())
        builder.add_generic_binary_data(str(record), [lb.Metadata(MANIFEST_ITEM, True, lb.DType.BOOL)])

        with atomic_path(out_file) as partial:
            with open(partial, "wb") as f:  # the builder seeks back to write the header last
                builder.build(f, validate_metadata=True)
            _, problems = verify_litertlm(partial)  # what was written is what was planned
            if problems:
                raise BundleError(f"litert-lm-builder did not write the planned file: {'; '.join(problems)}")
    return out_file

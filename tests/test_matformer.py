"""MatFormer Mix-n-Match: `g3n-convert slice` against a reference slicing written here from the
recipe, transformers on the sliced checkpoint against g3n-run on bundles sliced on the fly, the
published table's effective parameters, and one error per kind of invalid configuration."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bundle.errors import MatformerError
from bundle.manifest import read_manifest
from bundle.names import TEXT_BUNDLES
from converter.cli import main
from converter.config import FULL, SLIDING, variant_config
from converter.matformer import MatformerConfig, MatformerSlice, effective_parameters, load_matformer, published_configs
from runtime import Session
from runtime.chat import Tokenizer
from tests.conftest import TINY_CACHE, TINY_PREFILL
from tests.support.tiny_checkpoint import build_tiny_checkpoint, tiny_e4b_config, vary_final_norm

# On the tiny E4B-shaped model (8 layers: sliding/full pairs, 4..7 KV-shared, reading 2 and 3):
CONFIGS = {
    # Only FFN widths change, each layer its own.
    "layer-level": {"ffn_hidden_dims": [64, 128, 48, 64, 128, 64, 96, 32], "layers_skipped": []},
    # A whole block of the KV-shared region skipped, as the official E2B skips E4B's 20-24.
    "block-level": {"ffn_hidden_dims": [64] * 6, "layers_skipped": [4, 5]},
    # One full-attention layer before the shared ones: the layer types after it shift, so a
    # slice that left layer_types as it was would give the shared layers the wrong caches.
    "skip-before-shared": {"ffn_hidden_dims": [64, 64, 32, 64, 64, 64, 64], "layers_skipped": [1]},
}
PROMPT = [2, 100, 77, 300, 12, 99, 250, 480, 33, 17, 64, 200]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def e4b_shaped(tmp_path_factory) -> Path:
    """A tiny multimodal Gemma 3n with E4B's layer structure (tests/support/tiny_checkpoint.py)."""
    return vary_final_norm(build_tiny_checkpoint(tmp_path_factory.mktemp("e4b") / "tiny-e4b", seed=4, cfg=tiny_e4b_config()))


def config_file(folder: Path, name: str, **fields) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"name": name, **(fields or CONFIGS[name])}))
    return path


def run_slice(checkpoint: Path, matformer, out: Path):
    return CliRunner().invoke(main, ["slice", "--checkpoint", str(checkpoint), "--matformer", str(matformer),
                                     "--out", str(out), "-q"])


# ---- the reference: the recipe, written out on whole tensors -------------------------------------
def reference_slice(checkpoint: Path, widths: list[int], skipped: list[int]) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    hf = json.loads((checkpoint / "config.json").read_text())
    text = hf["text_config"]
    n, per_layer = text["num_hidden_layers"], text["hidden_size_per_layer_input"]
    kept = [i for i in range(n) if i not in skipped]
    first_shared = n - text["num_kv_shared_layers"]

    text_out = dict(text)
    text_out["num_hidden_layers"] = len(kept)
    text_out["intermediate_size"] = widths
    text_out["num_kv_shared_layers"] = text["num_kv_shared_layers"] - sum(1 for i in skipped if i >= first_shared)
    text_out["activation_sparsity_pattern"] = [text["activation_sparsity_pattern"][i] for i in kept]
    text_out["layer_types"] = [text["layer_types"][i] for i in kept]
    config = dict(hf, text_config=text_out)

    weights = load_file(checkpoint / "model.safetensors")
    lm = "model.language_model."
    ple_index = torch.cat([torch.arange(i * per_layer, (i + 1) * per_layer) for i in kept])
    out = {}
    for name, value in weights.items():
        layer = re.match(rf"^{re.escape(lm)}layers\.(\d+)\.(.+)$", name)
        if layer:
            old, rest = int(layer.group(1)), layer.group(2)
            if old in skipped:
                continue
            new = kept.index(old)
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                value = value[: widths[new]]
            elif rest == "mlp.down_proj.weight":
                value = value[:, : widths[new]]
            out[f"{lm}layers.{new}.{rest}"] = value
        elif name == f"{lm}embed_tokens_per_layer.weight":
            out[name] = value[:, ple_index]
        elif name == f"{lm}per_layer_model_projection.weight":
            out[name] = value[ple_index]
        else:
            out[name] = value
    return config, out


def load_sliced(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_slice_equals_the_reference_slicing(name, e4b_shaped, tmp_path):
    out = tmp_path / "sliced"
    result = run_slice(e4b_shaped, config_file(tmp_path, name), out)
    assert result.exit_code == 0, result.output
    config, tensors = reference_slice(e4b_shaped, **{"widths": CONFIGS[name]["ffn_hidden_dims"],
                                                      "skipped": CONFIGS[name]["layers_skipped"]})
    got_config = json.loads((out / "config.json").read_text())
    assert got_config == config, "config.json field for field"
    got = load_sliced(out)
    assert sorted(got) == sorted(tensors)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert (out / "tokenizer.model").read_bytes() == (e4b_shaped / "tokenizer.model").read_bytes()


def test_sliced_shards_and_index_load_in_transformers(e4b_shaped, tmp_path):
    """Shards of at most 4 MB (so the tiny model needs several) and their index, as at real size."""
    from transformers import Gemma3nForConditionalGeneration

    from converter.hf_slice import slice_checkpoint

    out = tmp_path / "sharded"
    summary = slice_checkpoint(e4b_shaped, config_file(tmp_path, "block-level"), out, shard_bytes=4 << 20)
    assert len(summary["shards"]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(summary["shards"])
    assert index["metadata"]["total_size"] == summary["bytes"] == sum(v.numel() * v.element_size() for v in load_sliced(out).values())
    model, info = Gemma3nForConditionalGeneration.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.text_config.num_hidden_layers == 6


def hf_greedy(folder: Path) -> list[int]:
    from transformers import Gemma3nForConditionalGeneration

    model = Gemma3nForConditionalGeneration.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    stops = sorted(Tokenizer(folder / "tokenizer.model").stop_ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bundles_sliced_on_the_fly_match_transformers_on_the_sliced_checkpoint(name, e4b_shaped, tmp_path):
    from converter.pipeline import ConvertOptions, convert

    matformer = config_file(tmp_path, name)
    assert run_slice(e4b_shaped, matformer, tmp_path / "hf").exit_code == 0
    expected = hf_greedy(tmp_path / "hf")
    assert len(set(expected)) > 8, "a varied reply, not an echo"

    bundle = tmp_path / "bundle"
    convert(ConvertOptions(out=bundle, checkpoint=e4b_shaped, matformer=str(matformer), bundles=TEXT_BUNDLES,
                           prefill_lengths=TINY_PREFILL, cache_length=TINY_CACHE))
    manifest = read_manifest(bundle)
    assert manifest.matformer.name == name
    assert list(manifest.matformer.ffn_hidden_dims) == CONFIGS[name]["ffn_hidden_dims"]
    assert list(manifest.matformer.layers_skipped) == CONFIGS[name]["layers_skipped"]
    assert manifest.config["intermediate_sizes"] == CONFIGS[name]["ffn_hidden_dims"]
    assert not any(bundle.glob("*.safetensors")), "no sliced copy of the weights"
    result = Session(bundle).generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_kept_layer_attends_as_before(name):
    """Each kept layer keeps its attention type and reads the KV cache it read in the full model.
    This is why layer_types is sliced: skipping layer 1 (full attention) shifts the types, and
    the unsliced pattern would make 6 of the 7 kept layers attend with the other type."""
    full = tiny_e4b_config()
    fields = CONFIGS[name]
    plan = MatformerSlice(full, MatformerConfig(name, tuple(fields["ffn_hidden_dims"]), tuple(fields["layers_skipped"])))
    for new, old in enumerate(plan.kept):
        assert plan.cfg.layer_types[new] == full.layer_types[old]
        assert plan.kept[plan.cfg.kv_source_layer(new)] == full.kv_source_layer(old)
    if name == "skip-before-shared":
        unsliced = full.layer_types[:len(plan.kept)]
        assert sum(a != b for a, b in zip(unsliced, plan.cfg.layer_types)) == 6


def test_random_weights_slice_on_the_fly_with_every_option(e4b_shaped, tmp_path):
    """--random-weights --matformer with int4 and --format both: the slice of the full model's
    random weights (each tensor the full one's rows and columns), recorded in the manifest."""
    from converter.checkpoint import RandomWeights, expected_shapes
    from converter.config import tiny_config
    from converter.matformer import SlicedWeights

    matformer = config_file(tmp_path, "tiny-custom", ffn_hidden_dims=[64, 128, 32, 64, 64, 96], layers_skipped=[4])
    out = tmp_path / "out"
    args = ["--variant", "tiny", "--random-weights", "--matformer", str(matformer), "--quant", "int4",
            "--bundles", "embedder,ple,text_core", "--prefill-lengths", "8", "--cache-length", "32",
            "--format", "both", "--tokenizer", str(e4b_shaped / "tokenizer.model"), "--no-quality-report",
            "--out", str(out), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout[result.stdout.index("{"):])
    assert manifest["variant"] == "tiny-tiny-custom"
    assert manifest["matformer"]["layers_kept"] == 6 and manifest["matformer"]["layers_skipped"] == [4]
    assert manifest["config"]["num_kv_shared_layers"] == 2  # 3 less the skipped layer 4
    assert (out / "tiny-tiny-custom.litertlm").is_file()

    full = tiny_config()
    plan = MatformerSlice(full, load_matformer(matformer))
    whole = RandomWeights(full, 0, expected_shapes(full))
    sliced = SlicedWeights(whole, plan)
    assert torch.equal(sliced.tensor("decoder.layers.4.mlp.up_proj.weight"), whole.tensor("decoder.layers.5.mlp.up_proj.weight")[:64])
    assert torch.equal(sliced.tensor("decoder.layers.2.mlp.down_proj.weight"), whole.tensor("decoder.layers.2.mlp.down_proj.weight")[:, :32])
    ple = whole.tensor("ple.embed_tokens_per_layer.weight")
    p = full.hidden_size_per_layer_input
    expected = torch.cat([ple[:, i * p:(i + 1) * p] for i in plan.kept], dim=1)
    assert torch.equal(torch.from_numpy(sliced.read_rows("ple.embed_tokens_per_layer.weight", 5, 9)), expected[5:9])
    projection = whole.tensor("decoder.per_layer_model_projection.weight")
    rows = torch.cat([projection[i * p:(i + 1) * p] for i in plan.kept])
    assert torch.equal(torch.from_numpy(sliced.read_rows("decoder.per_layer_model_projection.weight", 60, 140)), rows[60:140])


# ---- the published table ---------------------------------------------------------------------------
def test_published_configurations_effective_parameters():
    """"Effective" parameters, as Google counts them for E2B (1.91 B) and E4B (3.98 B): the text
    decoder's, without the embed_tokens and PLE tables (a row per token, read from flash) and the
    encoders, with the K/V projections the KV-shared layers carry unused."""
    e4b = variant_config("e4b")
    configs = published_configs()
    assert len(configs) == 16
    counts = {name: effective_parameters(MatformerSlice(e4b, mf).cfg) for name, mf in configs.items()}
    # The two released models: E4B itself and the official E2B, exactly at the table's decimals.
    assert round(counts["main-model"] / 1e9, 2) == 3.98
    assert round(counts["official-e2b-model"] / 1e9, 2) == 1.91
    assert effective_parameters(variant_config("e2b")) == counts["official-e2b-model"]  # the slice is E2B's shape
    matching = [n for n, c in counts.items() if round(c / 1e9, 2) == configs[n].published_effective_b]
    assert matching == ["main-model", "official-e2b-model", "e1.96b-layer-level", "e3.18b-layer-level"]
    # The other twelve figures are up to 0.019 B above g3n's count, and no count could meet them
    # all: narrowing one layer from 16384 to 8192 removes exactly 3 x 2048 x 8192 parameters, so
    # main-model and e3.79b-layer-level (4 layers narrower) differ by 0.2013 B, while their published
    # figures, 3.98 and 3.79, allow at most 0.200 B between them, even rounded.
    ffn = 3 * 2048 * 8192
    assert counts["main-model"] - counts["e3.79b-layer-level"] == 4 * ffn
    assert 4 * ffn / 1e9 > (3.98 + 0.005) - (3.79 - 0.005)
    for name, mf in configs.items():
        assert -0.005 <= mf.published_effective_b - counts[name] / 1e9 < 0.02, name  # rounding, and the gap above


def test_matformer_list(tmp_path):
    result = CliRunner().invoke(main, ["matformer", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert [r["name"] for r in rows] == list(published_configs())
    e2b = next(r for r in rows if r["name"] == "official-e2b-model")
    assert e2b["layers_kept"] == 30 and e2b["layers_skipped"] == [20, 21, 22, 23, 24] and e2b["mmlu_pt_percent"] == 50.9
    sizes = {r["name"]: r["estimated_int4_folder_bytes"] for r in rows}
    assert sizes["official-e2b-model"] < sizes["e2.98b-block-level"] < sizes["main-model"]
    table = CliRunner().invoke(main, ["matformer", "list"])
    assert table.exit_code == 0 and "e2.98b-block-level" in table.output and "official-e2b-model" in table.output


def test_published_csv_ships_with_the_package():
    from importlib import resources

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "matformer_slicing_configs.csv"
    packaged = resources.files("converter").joinpath("data", "matformer_slicing_configs.csv").read_text()
    if shared.is_file():
        assert packaged == shared.read_text()
    assert packaged.count("\n") == 17


# ---- invalid configurations: one clear error each ---------------------------------------------------
INVALID = [
    ("skips a KV source", {"ffn_hidden_dims": [64] * 7, "layers_skipped": [3]},
     "layer 3 cannot be skipped: it holds the full-attention KV cache that the KV-shared layers 5, 7 read"),
    ("too wide", {"ffn_hidden_dims": [64, 64, 97, 64, 64, 64, 64, 64], "layers_skipped": []},
     "ffn_hidden_dims[2] is 97: layer 2's FFN has 96 units, so a width must be 1-96"),
    ("wrong length", {"ffn_hidden_dims": [64] * 7, "layers_skipped": []},
     "ffn_hidden_dims has 7 widths; the model keeps 8 layers (8 less 0 skipped), one width each"),
    ("out of range", {"ffn_hidden_dims": [64] * 7, "layers_skipped": [8]},
     "layers_skipped has layer 8, out of range: the model has 8 layers (0-7)"),
    ("repeated", {"ffn_hidden_dims": [64] * 6, "layers_skipped": [5, 5]}, "layers_skipped lists a layer more than once"),
    ("zero width", {"ffn_hidden_dims": [0] * 8, "layers_skipped": []}, "ffn_hidden_dims[0] is 0"),
    ("not integers", {"ffn_hidden_dims": [64.0] * 8, "layers_skipped": []}, "'ffn_hidden_dims' must be a list of integers"),
    ("typo", {"ffn_hidden_dim": [64] * 8, "layers_skipped": []}, "unknown key(s) ffn_hidden_dim"),
]


@pytest.mark.parametrize("case, fields, message", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_configuration_is_one_clear_error(case, fields, message, e4b_shaped, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(fields))
    out = tmp_path / "out"
    result = run_slice(e4b_shaped, path, out)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("g3n-convert: error: ") and message in line, line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    # The same error from the main command, before any conversion work.
    convert = CliRunner().invoke(main, ["--checkpoint", str(e4b_shaped), "--matformer", str(path), "--out", str(out)])
    assert convert.exit_code == 1 and message in convert.output and not (out / "manifest.json").exists()


def test_published_configuration_on_a_model_it_does_not_nest(e4b_shaped, tmp_path):
    result = run_slice(e4b_shaped, "e2.98b-block-level", tmp_path / "out")
    assert result.exit_code == 1
    assert ("'e2.98b-block-level' is a published configuration of E4B (35 layers, FFN 16384); this model "
            "(8 layers, FFN widths 96/128) does not nest it") in result.output
    with pytest.raises(MatformerError, match="does not nest it"):  # E2B is smaller than E4B: nothing nests
        MatformerSlice(variant_config("e2b"), load_matformer("official-e2b-model"))
    unknown = run_slice(e4b_shaped, "e2.99b-made-up", tmp_path / "out")
    assert unknown.exit_code == 1 and "neither a published MatFormer configuration nor a JSON file" in unknown.output


def test_published_configurations_skip_no_kv_source():
    e4b = variant_config("e4b")
    from converter.matformer import kv_sources

    assert kv_sources(e4b) == {18: SLIDING, 19: FULL}
    for mf in published_configs().values():
        plan = MatformerSlice(e4b, mf)
        assert 18 in plan.kept and 19 in plan.kept
        assert plan.cfg.num_kv_shared_layers == 15 - sum(1 for i in mf.layers_skipped if i >= 20)


def test_slice_refuses_a_non_empty_output_folder(e4b_shaped, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_slice(e4b_shaped, "main-model", out)
    assert result.exit_code == 1 and "already exists and is not empty" in result.output
    assert (out / "keep.txt").read_text() == "mine"

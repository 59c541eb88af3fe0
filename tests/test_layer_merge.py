"""Tests of the layer-space merges (passthrough, dfs, ps_dfs) on tiny Llama models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.exceptions import CheckpointNotFoundError, ConfigError, IncompatibleModelsError
from evomerge.merge.engine import MergeOptions, run_merge
from evomerge.merge.layer_path import LayerPathGenome, layer_path_spec
from evomerge.merge.layers import LAYER_MERGE_FUNCTIONS, dfs_merge, fold_layer_path, passthrough_merge, ps_dfs_merge
from evomerge.merge.spec import MergeSpec, spec_from_dict
from evomerge.testing import make_tiny_family, make_tiny_llama

LAYERS = 4
OPTIONS = MergeOptions()
O_PROJ = "model.layers.{}.self_attn.o_proj.weight"
DOWN_PROJ = "model.layers.{}.mlp.down_proj.weight"
Q_PROJ = "model.layers.{}.self_attn.q_proj.weight"
NORM = "model.layers.{}.input_layernorm.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """Save base, ft1 and ft2, each config with per-layer lists that name the model and layer."""
    root = tmp_path_factory.mktemp("family")
    paths = dict(zip(("base", "ft1", "ft2"), make_tiny_family(root, count=2)))
    for name, path in paths.items():
        config_path = path / "config.json"
        config = json.loads(config_path.read_text())
        config["layer_types"] = ["full_attention"] * LAYERS
        config["layer_tags"] = [f"{name}-{layer}" for layer in range(LAYERS)]
        config_path.write_text(json.dumps(config))
    return paths


@pytest.fixture(scope="module")
def tensors(family) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(path / "model.safetensors") for name, path in family.items()}


def passthrough_spec(*sources, base_model=None):
    slices = [{"sources": [source]} for source in sources]
    data = {"merge_method": "passthrough", "slices": slices}
    if base_model:
        data["base_model"] = base_model
    return spec_from_dict(data)


def dfs_spec(steps, embed_model=None):
    data = {"merge_method": "dfs", "layer_path": steps}
    if embed_model:
        data["embed_model"] = embed_model
    return spec_from_dict(data)


def causal_lm(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def run_path_by_hand(steps, models, embed, input_ids, eps):
    """Run the scaled layer path with transformers modules; step k's norms use ``eps * c_k**2``.

    That epsilon makes the scaled path equal to the folded model in exact
    arithmetic, because Norm(c z) with epsilon eps * c**2 equals Norm(z) with eps.
    """
    length = input_ids.shape[1]
    position_ids = torch.arange(length)[None]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    hidden = embed.model.embed_tokens(input_ids)
    position_embeddings = embed.model.rotary_emb(hidden, position_ids)

    cumulative = 1.0
    for model_name, layer_index, scale in steps:
        cumulative *= scale
        layer = models[model_name].model.layers[layer_index]
        layer.input_layernorm.variance_epsilon = eps * cumulative**2
        layer.post_attention_layernorm.variance_epsilon = eps * cumulative**2
        hidden = layer(
            hidden * scale,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
        )

    embed.model.norm.variance_epsilon = eps * cumulative**2
    return embed.lm_head(embed.model.norm(hidden))


def test_layer_functions_registered():
    assert LAYER_MERGE_FUNCTIONS["passthrough"] is passthrough_merge
    assert LAYER_MERGE_FUNCTIONS["frankenmerge"] is passthrough_merge
    assert LAYER_MERGE_FUNCTIONS["dfs"] is dfs_merge
    assert LAYER_MERGE_FUNCTIONS["ps_dfs"] is ps_dfs_merge


def test_passthrough_copies_slice_values(family, tensors, tmp_path):
    spec = passthrough_spec(
        {"model": str(family["base"]), "layer_range": [0, 2]},
        {"model": str(family["ft1"]), "layer_range": [1, 4]},
    )

    output = passthrough_merge(spec, tmp_path / "out", OPTIONS)
    written = load_file(output / "model.safetensors")

    assert torch.equal(written[Q_PROJ.format(1)], tensors["base"][Q_PROJ.format(1)])
    assert torch.equal(written[Q_PROJ.format(2)], tensors["ft1"][Q_PROJ.format(1)])
    assert torch.equal(written[O_PROJ.format(4)], tensors["ft1"][O_PROJ.format(3)])
    assert torch.equal(written["model.embed_tokens.weight"], tensors["base"]["model.embed_tokens.weight"])
    assert torch.equal(written["lm_head.weight"], tensors["base"]["lm_head.weight"])
    assert "model.layers.5.self_attn.q_proj.weight" not in written


def test_passthrough_base_model_gives_embeddings(family, tensors, tmp_path):
    spec = passthrough_spec({"model": str(family["ft1"]), "layer_range": [0, 4]}, base_model=str(family["ft2"]))

    written = load_file(passthrough_merge(spec, tmp_path / "out", OPTIONS) / "model.safetensors")

    assert torch.equal(written["model.embed_tokens.weight"], tensors["ft2"]["model.embed_tokens.weight"])
    assert torch.equal(written["model.norm.weight"], tensors["ft2"]["model.norm.weight"])
    assert torch.equal(written[Q_PROJ.format(0)], tensors["ft1"][Q_PROJ.format(0)])


def test_passthrough_scale_hits_output_projections(family, tensors, tmp_path):
    spec = passthrough_spec({"model": str(family["ft1"]), "layer_range": [2, 3], "parameters": {"scale": 0.25}})

    written = load_file(passthrough_merge(spec, tmp_path / "out", OPTIONS) / "model.safetensors")

    assert torch.allclose(written[O_PROJ.format(0)], tensors["ft1"][O_PROJ.format(2)] * 0.25)
    assert torch.allclose(written[DOWN_PROJ.format(0)], tensors["ft1"][DOWN_PROJ.format(2)] * 0.25)
    assert torch.equal(written[Q_PROJ.format(0)], tensors["ft1"][Q_PROJ.format(2)])
    assert torch.equal(written[NORM.format(0)], tensors["ft1"][NORM.format(2)])


def test_passthrough_repeated_layers_independent(family, tensors, tmp_path):
    spec = passthrough_spec(
        {"model": str(family["base"]), "layer_range": [0, 2]},
        {"model": str(family["base"]), "layer_range": [1, 2], "parameters": {"scale": 0.0}},
    )

    output = passthrough_merge(spec, tmp_path / "out", OPTIONS)
    written = load_file(output / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(output)
    first = model.model.layers[1].self_attn.o_proj.weight
    second = model.model.layers[2].self_attn.o_proj.weight

    assert torch.equal(written[O_PROJ.format(1)], tensors["base"][O_PROJ.format(1)])
    assert torch.count_nonzero(written[O_PROJ.format(2)]) == 0
    assert torch.equal(written[Q_PROJ.format(2)], written[Q_PROJ.format(1)])
    assert first.data_ptr() != second.data_ptr()


def test_passthrough_config_lists_rebuilt(family, tmp_path):
    spec = passthrough_spec(
        {"model": str(family["ft2"]), "layer_range": [3, 4]},
        {"model": str(family["base"]), "layer_range": [0, 3]},
        {"model": str(family["ft2"]), "layer_range": [3, 4]},
    )

    output = passthrough_merge(spec, tmp_path / "out", OPTIONS)
    config = json.loads((output / "config.json").read_text())

    assert config["num_hidden_layers"] == 5
    assert config["layer_tags"] == ["ft2-3", "base-0", "base-1", "base-2", "ft2-3"]
    assert config["layer_types"] == ["full_attention"] * 5
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_passthrough_output_generates(family, tmp_path):
    spec = passthrough_spec(
        {"model": str(family["base"]), "layer_range": [0, 3]},
        {"model": str(family["ft1"]), "layer_range": [1, 4]},
    )

    output = passthrough_merge(spec, tmp_path / "out", OPTIONS)
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)

    assert model.config.num_hidden_layers == 6
    assert len(model.model.layers) == 6
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


def test_passthrough_rejects_out_of_range(family, tmp_path):
    spec = passthrough_spec(
        {"model": str(family["base"]), "layer_range": [0, 2]},
        {"model": str(family["ft1"]), "layer_range": [2, 6]},
    )
    with pytest.raises(ConfigError, match=r"slice 1 \(layer_range \[2, 6\]\): layer 4 .* has 4 layers"):
        passthrough_merge(spec, tmp_path / "out", OPTIONS)
    assert not (tmp_path / "out").exists()


def test_passthrough_rejects_empty_range(family, tmp_path):
    spec = passthrough_spec({"model": str(family["base"]), "layer_range": [2, 2]})
    with pytest.raises(ConfigError, match=r"slice 0 layer_range \[2, 2\]"):
        passthrough_merge(spec, tmp_path / "out", OPTIONS)


def test_passthrough_rejects_several_sources(family, tmp_path):
    spec = spec_from_dict(
        {
            "merge_method": "passthrough",
            "slices": [
                {
                    "sources": [
                        {"model": str(family["base"]), "layer_range": [0, 2]},
                        {"model": str(family["ft1"]), "layer_range": [0, 2]},
                    ]
                }
            ],
        }
    )
    with pytest.raises(ConfigError, match="slice 0 has 2 sources"):
        passthrough_merge(spec, tmp_path / "out", OPTIONS)


def test_passthrough_rejects_shape_mismatch(family, tmp_path):
    wide = make_tiny_llama(tmp_path / "wide", seed=5, hidden_size=48, with_tokenizer=False)
    spec = passthrough_spec(
        {"model": str(family["base"]), "layer_range": [0, 2]},
        {"model": str(wide), "layer_range": [0, 2]},
    )
    expected = r"slice 1 .*'input_layernorm.weight' of shape \[48\] \(reference: \[32\]\)"
    with pytest.raises(IncompatibleModelsError, match=expected):
        passthrough_merge(spec, tmp_path / "out", OPTIONS)
    assert not (tmp_path / "out").exists()


def test_passthrough_scale_gradient(family, tensors, tmp_path):
    spec = passthrough_spec({"model": str(family["ft1"]), "layer_range": [1, 4], "parameters": {"scale": [0.0, 1.0]}})

    written = load_file(passthrough_merge(spec, tmp_path / "out", OPTIONS) / "model.safetensors")

    for position, factor in enumerate([0.0, 0.5, 1.0]):
        source_layer = position + 1
        expected_o_proj = tensors["ft1"][O_PROJ.format(source_layer)] * factor
        expected_down_proj = tensors["ft1"][DOWN_PROJ.format(source_layer)] * factor
        assert torch.allclose(written[O_PROJ.format(position)], expected_o_proj)
        assert torch.allclose(written[DOWN_PROJ.format(position)], expected_down_proj)


def test_passthrough_scale_filter(family, tensors, tmp_path):
    scale = [{"filter": "o_proj", "value": 0.5}, {"value": 2.0}]
    spec = passthrough_spec({"model": str(family["ft2"]), "layer_range": [0, 1], "parameters": {"scale": scale}})

    written = load_file(passthrough_merge(spec, tmp_path / "out", OPTIONS) / "model.safetensors")

    assert torch.allclose(written[O_PROJ.format(0)], tensors["ft2"][O_PROJ.format(0)] * 0.5)
    assert torch.allclose(written[DOWN_PROJ.format(0)], tensors["ft2"][DOWN_PROJ.format(0)] * 2.0)
    assert torch.equal(written[NORM.format(0)], tensors["ft2"][NORM.format(0)])


@pytest.mark.parametrize("bad_scale", [True, float("nan"), [1.0, float("inf")]])
def test_passthrough_rejects_bad_scale(family, tmp_path, bad_scale):
    spec = passthrough_spec({"model": str(family["base"]), "layer_range": [0, 2], "parameters": {"scale": bad_scale}})
    with pytest.raises(ConfigError, match="slice 0 has scale"):
        passthrough_merge(spec, tmp_path / "out", OPTIONS)


def test_passthrough_rejects_unknown_parameter(family, tmp_path):
    spec = passthrough_spec({"model": str(family["base"]), "layer_range": [0, 2], "parameters": {"weight": 0.5}})
    with pytest.raises(ConfigError, match=r"\['weight'\]"):
        passthrough_merge(spec, tmp_path / "out", OPTIONS)


def test_fold_scales_are_inverse_products():
    steps = dfs_spec(
        [
            {"model": "a", "layer": 0, "scale": 2.0},
            {"model": "b", "layer": 1, "scale": 0.5},
            {"model": "a", "layer": 2, "scale": 4.0},
        ]
    ).layer_path

    placements = fold_layer_path(steps)

    assert [placement.attention_scale for placement in placements] == [0.5, 1.0, 0.25]
    assert [placement.mlp_scale for placement in placements] == [0.5, 1.0, 0.25]


def test_dfs_matches_hand_run(family, tmp_path):
    path = [("ft1", 0, 1.0), ("ft2", 2, 0.5), ("ft1", 0, 2.5), ("base", 3, 1.7), ("ft2", 1, 0.8)]
    spec = dfs_spec(
        [{"model": str(family[name]), "layer": layer, "scale": scale} for name, layer, scale in path],
        embed_model=str(family["ft2"]),
    )

    output = dfs_merge(spec, tmp_path / "out", OPTIONS)
    merged = causal_lm(output)
    models = {name: causal_lm(family_path) for name, family_path in family.items()}
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    eps = merged.config.rms_norm_eps
    with torch.no_grad():
        expected = run_path_by_hand(path, models, models["ft2"], input_ids, eps)
        actual = merged(input_ids).logits

    assert merged.config.num_hidden_layers == 5
    assert expected.abs().max() > 1e-2
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4)


def test_dfs_identity_path_reproduces_model(family, tmp_path):
    spec = dfs_spec([{"model": str(family["ft1"]), "layer": layer} for layer in range(LAYERS)])

    merged = causal_lm(dfs_merge(spec, tmp_path / "out", OPTIONS))
    original = causal_lm(family["ft1"])
    input_ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(merged(input_ids).logits, original(input_ids).logits)


@pytest.mark.parametrize("bad_scale", [0.0, -0.5, float("inf")])
def test_dfs_rejects_bad_scale(family, tmp_path, bad_scale):
    spec = dfs_spec(
        [{"model": str(family["base"]), "layer": 0}, {"model": str(family["ft1"]), "layer": 1, "scale": bad_scale}]
    )
    with pytest.raises(ConfigError, match="layer_path step 1 .* has scale"):
        dfs_merge(spec, tmp_path / "out", OPTIONS)


def test_dfs_rejects_out_of_range(family, tmp_path):
    spec = dfs_spec([{"model": str(family["base"]), "layer": 0}, {"model": str(family["ft1"]), "layer": 4}])
    with pytest.raises(ConfigError, match="layer_path step 1: layer 4"):
        dfs_merge(spec, tmp_path / "out", OPTIONS)


def test_dfs_rejects_unknown_model(family, tmp_path):
    missing = str(tmp_path / "no-such-model")
    spec = dfs_spec([{"model": str(family["base"]), "layer": 0}, {"model": missing, "layer": 0}])
    with pytest.raises(CheckpointNotFoundError, match="no-such-model"):
        dfs_merge(spec, tmp_path / "out", OPTIONS)


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    path = tmp_path_factory.mktemp("gemma2") / "model"
    Gemma2ForCausalLM(config).save_pretrained(path)
    return path


def test_dfs_rejects_unfoldable_architecture(tiny_gemma2, tmp_path):
    spec = dfs_spec([{"model": str(tiny_gemma2), "layer": 0}, {"model": str(tiny_gemma2), "layer": 1, "scale": 0.5}])
    with pytest.raises(ConfigError, match="model_type 'gemma2'.*normalises each sublayer's output"):
        dfs_merge(spec, tmp_path / "out", OPTIONS)


def test_dfs_unit_scales_need_no_fold(tiny_gemma2, tmp_path):
    spec = dfs_spec([{"model": str(tiny_gemma2), "layer": 1}, {"model": str(tiny_gemma2), "layer": 1}])

    output = dfs_merge(spec, tmp_path / "out", OPTIONS)
    config = json.loads((output / "config.json").read_text())

    assert config["num_hidden_layers"] == 2
    assert config["layer_types"] == ["full_attention", "full_attention"]


def test_dfs_rejects_mixed_architectures(family, tiny_gemma2, tmp_path):
    spec = dfs_spec([{"model": str(family["base"]), "layer": 0}, {"model": str(tiny_gemma2), "layer": 0}])
    with pytest.raises(IncompatibleModelsError, match="model_type 'gemma2'"):
        dfs_merge(spec, tmp_path / "out", OPTIONS)


def ps_dfs_spec(data) -> MergeSpec:
    return MergeSpec.model_validate(data)


def test_ps_dfs_uses_parameter_merge(family, tensors, tmp_path):
    models = [
        {"model": str(family["ft1"]), "parameters": {"weight": 0.25}},
        {"model": str(family["ft2"]), "parameters": {"weight": 0.75}},
    ]
    spec = ps_dfs_spec(
        {
            "merge_method": "ps_dfs",
            "ps_method": "linear",
            "models": models,
            "layer_path": [
                {"model": "ps", "layer": 0},
                {"model": str(family["base"]), "layer": 2, "scale": 0.5},
                {"model": "ps", "layer": 3},
            ],
        }
    )
    linear = spec_from_dict({"merge_method": "linear", "models": models})

    output = ps_dfs_merge(spec, tmp_path / "out", OPTIONS)
    reference = load_file(run_merge(linear, tmp_path / "linear", OPTIONS) / "model.safetensors")
    base = load_file(family["base"] / "model.safetensors")
    written = load_file(output / "model.safetensors")

    expected_q = 0.25 * tensors["ft1"][Q_PROJ.format(0)] + 0.75 * tensors["ft2"][Q_PROJ.format(0)]
    assert torch.allclose(written[Q_PROJ.format(0)], expected_q, atol=1e-7)
    assert torch.equal(written[Q_PROJ.format(0)], reference[Q_PROJ.format(0)])
    assert torch.equal(written[Q_PROJ.format(1)], base[Q_PROJ.format(2)])
    assert torch.allclose(written[O_PROJ.format(1)], base[O_PROJ.format(2)] * 2.0)
    assert torch.allclose(written[O_PROJ.format(2)], reference[O_PROJ.format(3)] * 2.0)
    assert torch.equal(written["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["linear", "out"]


def test_ps_dfs_rejects_missing_method(family, tmp_path):
    spec = ps_dfs_spec(
        {
            "merge_method": "ps_dfs",
            "models": [{"model": str(family["ft1"])}],
            "layer_path": [{"model": "ps", "layer": 0}],
        }
    )
    with pytest.raises(ConfigError, match="ps_dfs needs ps_method"):
        ps_dfs_merge(spec, tmp_path / "out", OPTIONS)


def test_ps_dfs_rejects_layer_method(family, tmp_path):
    spec = ps_dfs_spec(
        {
            "merge_method": "ps_dfs",
            "ps_method": "dfs",
            "models": [{"model": str(family["ft1"])}],
            "layer_path": [{"model": "ps", "layer": 0}],
        }
    )
    with pytest.raises(ConfigError, match="'dfs' is a layer-space method"):
        ps_dfs_merge(spec, tmp_path / "out", OPTIONS)


def test_run_merge_dispatches_frankenmerge(family, tensors, tmp_path):
    source = {"model": str(family["ft2"]), "layer_range": [1, 3]}
    spec = spec_from_dict({"merge_method": "frankenmerge", "slices": [{"sources": [source]}]})

    written = load_file(run_merge(spec, tmp_path / "out", OPTIONS) / "model.safetensors")

    assert torch.equal(written[Q_PROJ.format(0)], tensors["ft2"][Q_PROJ.format(1)])
    assert "model.layers.2.self_attn.q_proj.weight" not in written


def test_dfs_writes_out_dtype(family, tensors, tmp_path):
    spec = dfs_spec([{"model": str(family["ft1"]), "layer": 1, "scale": 4.0}])

    output = dfs_merge(spec, tmp_path / "out", MergeOptions(out_dtype="bfloat16"))
    written = load_file(output / "model.safetensors")
    config = json.loads((output / "config.json").read_text())

    assert written[O_PROJ.format(0)].dtype == torch.bfloat16
    assert torch.equal(written[O_PROJ.format(0)], (tensors["ft1"][O_PROJ.format(1)] / 4.0).to(torch.bfloat16))
    assert config["dtype"] == "bfloat16"


def test_genome_path_builds_model(family, tensors, tmp_path):
    genome = LayerPathGenome(model_names=("base", "ft1"), layers_per_model=LAYERS)
    indicator, scales = genome.identity("ft1")
    indicator[genome.slot_index(1, "base", 0)] = 1
    scales[genome.slot_index(1, "base", 0)] = 0.5
    paths = {name: str(family[name]) for name in ("base", "ft1")}

    spec = layer_path_spec(genome.decode(indicator, scales), paths, embed_model="base")
    written = load_file(dfs_merge(spec, tmp_path / "out", OPTIONS) / "model.safetensors")

    assert torch.equal(written[Q_PROJ.format(3)], tensors["ft1"][Q_PROJ.format(3)])
    assert torch.equal(written[Q_PROJ.format(4)], tensors["base"][Q_PROJ.format(0)])
    assert torch.allclose(written[O_PROJ.format(4)], tensors["base"][O_PROJ.format(0)] * 2.0)
    assert torch.equal(written["lm_head.weight"], tensors["base"]["lm_head.weight"])


def test_dfs_sharded_output_loads(family, tmp_path):
    spec = dfs_spec([{"model": str(family["ft1"]), "layer": layer} for layer in range(LAYERS)])

    output = dfs_merge(spec, tmp_path / "out", MergeOptions(max_shard_bytes=64 * 1024))
    merged = causal_lm(output)
    original = causal_lm(family["ft1"])
    input_ids = torch.tensor([[2, 7, 1, 8, 2, 8]])

    assert len(list(output.glob("model-*.safetensors"))) > 1
    assert (output / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert torch.equal(merged(input_ids).logits, original(input_ids).logits)

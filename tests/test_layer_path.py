"""Tests of the layer-path genome: slot layout, decode/encode and validation."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.exceptions import ConfigError
from evomerge.merge.layer_path import LayerPathGenome, layer_path_spec
from evomerge.merge.spec import LayerStep


@pytest.fixture
def genome() -> LayerPathGenome:
    return LayerPathGenome(model_names=("a", "b"), layers_per_model=3, repeats=2)


def test_size_counts_all_slots(genome):
    assert genome.size == 12


def test_slot_order_is_repeat_model_layer(genome):
    assert genome.slot(0) == (0, "a", 0)
    assert genome.slot(4) == (0, "b", 1)
    assert genome.slot(7) == (1, "a", 1)
    assert genome.slot_index(1, "b", 2) == 11


def test_decode_hand_computed_path(genome):
    indicator = np.zeros(12, dtype=int)
    indicator[[1, 3, 7, 11]] = 1
    scales = np.arange(1, 13, dtype=float) / 4

    steps = genome.decode(indicator, scales)

    assert [(step.model, step.layer) for step in steps] == [("a", 1), ("b", 0), ("a", 1), ("b", 2)]
    assert [step.scale for step in steps] == [0.5, 1.0, 2.0, 3.0]


def test_decode_encode_round_trip(genome):
    rng = np.random.default_rng(7)
    for _ in range(20):
        indicator, _ = genome.random(rng)
        scales = rng.uniform(0.5, 2.0, size=genome.size)
        steps = genome.decode(indicator, scales)

        encoded_indicator, encoded_scales = genome.encode(steps)

        assert genome.decode(encoded_indicator, encoded_scales) == steps


def test_encode_canonical_arrays_round_trip(genome):
    indicator = np.zeros(12, dtype=np.int8)
    indicator[[0, 2, 4, 6, 9]] = 1
    scales = np.ones(12)
    scales[[0, 2, 4, 6, 9]] = [1.5, 0.5, 1.0, 2.0, 0.25]

    encoded_indicator, encoded_scales = genome.encode(genome.decode(indicator, scales))

    assert encoded_indicator.tolist() == indicator.tolist()
    assert encoded_scales.tolist() == scales.tolist()


def test_encode_uses_second_repeat(genome):
    steps = [LayerStep(model="b", layer=2), LayerStep(model="a", layer=0, scale=0.5)]

    indicator, scales = genome.encode(steps)

    assert np.flatnonzero(indicator).tolist() == [5, 6]
    assert scales[6] == 0.5


def test_encode_rejects_too_many_repeats(genome):
    steps = [LayerStep(model="a", layer=0)] * 3
    with pytest.raises(ConfigError, match="raise repeats"):
        genome.encode(steps)


def test_encode_rejects_unknown_model(genome):
    with pytest.raises(ConfigError, match="'c'"):
        genome.encode([LayerStep(model="c", layer=0)])


def test_encode_rejects_layer_out_of_range(genome):
    with pytest.raises(ConfigError, match="layer 3"):
        genome.encode([LayerStep(model="a", layer=3)])


def test_identity_is_own_layers(genome):
    indicator, scales = genome.identity("b")

    steps = genome.decode(indicator, scales)

    assert [(step.model, step.layer) for step in steps] == [("b", 0), ("b", 1), ("b", 2)]
    assert all(step.scale == 1.0 for step in steps)


def test_identity_rejects_unknown_model(genome):
    with pytest.raises(ConfigError, match="'z'"):
        genome.identity("z")


def test_validate_rejects_wrong_length(genome):
    with pytest.raises(ConfigError, match="indicator has 5 entries"):
        genome.validate([1] * 5, [1.0] * 12)
    with pytest.raises(ConfigError, match="scales has 3 entries"):
        genome.validate([1] * 12, [1.0] * 3)


def test_validate_rejects_empty_path(genome):
    with pytest.raises(ConfigError, match="empty"):
        genome.validate([0] * 12, [1.0] * 12)


def test_validate_rejects_non_binary_indicator(genome):
    with pytest.raises(ConfigError, match="0.5"):
        genome.validate([0.5] + [0] * 11, [1.0] * 12)


@pytest.mark.parametrize("bad_scale", [0.0, -1.0, float("nan"), float("inf")])
def test_validate_rejects_bad_scale(genome, bad_scale):
    scales = [1.0] * 12
    scales[4] = bad_scale
    indicator = [0] * 12
    indicator[4] = 1
    with pytest.raises(ConfigError, match="slot 4"):
        genome.validate(indicator, scales)


def test_validate_ignores_excluded_scales(genome):
    indicator, scales = genome.identity("a")
    scales[11] = -3.0

    genome.validate(indicator, scales)


def test_validate_rejects_long_path():
    genome = LayerPathGenome(model_names=("a", "b"), layers_per_model=3, max_path_length=2)
    with pytest.raises(ConfigError, match="max_path_length=2"):
        genome.validate(*genome.identity("a"))


def test_random_respects_max_path_length():
    genome = LayerPathGenome(model_names=("a", "b"), layers_per_model=4, max_path_length=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        indicator, scales = genome.random(rng, include_probability=0.9)
        assert 1 <= indicator.sum() <= 3
        assert scales.tolist() == [1.0] * genome.size


def test_genome_rejects_single_model():
    with pytest.raises(ConfigError, match="at least 2 models"):
        LayerPathGenome(model_names=("a",), layers_per_model=4)


def test_genome_rejects_duplicate_models():
    with pytest.raises(ConfigError, match="duplicates"):
        LayerPathGenome(model_names=("a", "a"), layers_per_model=4)


def test_spec_maps_names_to_paths():
    steps = [LayerStep(model="a", layer=1, scale=0.5), LayerStep(model="b", layer=0)]

    spec = layer_path_spec(steps, {"a": "/m/a", "b": "/m/b"}, embed_model="b", out_dtype="bfloat16")

    assert spec.merge_method == "dfs"
    assert [step.model for step in spec.layer_path] == ["/m/a", "/m/b"]
    assert spec.layer_path[0].scale == 0.5
    assert spec.embed_model == "/m/b"
    assert spec.out_dtype == "bfloat16"


def test_spec_rejects_unknown_model():
    with pytest.raises(ConfigError, match="'c'"):
        layer_path_spec([LayerStep(model="c", layer=0)], {"a": "/m/a"}, embed_model="a")


def test_spec_rejects_unknown_embed_model():
    with pytest.raises(ConfigError, match="embed_model 'x'"):
        layer_path_spec([LayerStep(model="a", layer=0)], {"a": "/m/a"}, embed_model="x")

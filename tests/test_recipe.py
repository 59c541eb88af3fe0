"""Recipes: canonical JSON, content keys, conversion to merge specs and validation."""

from __future__ import annotations

import pytest

from evomerge import recipe as recipe_module
from evomerge.evolution import ModelInfo
from evomerge.exceptions import ConfigError
from evomerge.recipe import Recipe, candidate_key, recipe_to_spec, validate_recipe

FINGERPRINTS = {"model:base": "fp-base", "model:a": "fp-a", "model:b": "fp-b"}
MODEL_INFO = {name: ModelInfo(num_layers=4, fingerprint=f"fp-{name}") for name in ("base", "a", "b")}


def ties_recipe(**changes) -> Recipe:
    fields = {
        "method": "ties",
        "inputs": ("model:a", "model:b"),
        "base": "model:base",
        "parameters": {"lambda": 1.0},
        "input_parameters": ({"weight": 0.5, "density": 0.7}, {"weight": 0.3, "density": 0.4}),
    }
    fields.update(changes)
    return Recipe(**fields)


def resolve(reference: str) -> str:
    return "/models/" + reference.split(":", 1)[1]


# -- canonical JSON and keys ----------------------------------------------------------


def test_canonical_json_exact_text():
    recipe = Recipe(method="linear", inputs=("model:a", "model:b"), input_parameters=({"weight": 1}, {"weight": -0.0}))
    expected = (
        '{"base":null,"input_parameters":[{"weight":1.0},{"weight":0.0}],"inputs":["model:a","model:b"],'
        '"layer_path":null,"method":"linear","parameters":{},"seed":null,"slices":null}'
    )
    assert recipe.canonical_json() == expected


def test_key_is_20_hex_digits():
    key = candidate_key(ties_recipe(), FINGERPRINTS)
    assert len(key) == 20
    assert all(ch in "0123456789abcdef" for ch in key)


def test_key_ignores_field_order():
    first = Recipe.model_validate(
        {"method": "ties", "base": "model:base", "inputs": ["model:a"], "parameters": {"lambda": 1.0, "normalize": True}}
    )
    second = Recipe.model_validate(
        {"parameters": {"normalize": True, "lambda": 1.0}, "inputs": ["model:a"], "base": "model:base", "method": "ties"}
    )
    assert candidate_key(first, FINGERPRINTS) == candidate_key(second, FINGERPRINTS)


def test_key_ignores_float_noise():
    noisy = ties_recipe(input_parameters=({"weight": 0.50000000001, "density": 0.7}, {"weight": 0.3, "density": 0.4}))
    assert candidate_key(noisy, FINGERPRINTS) == candidate_key(ties_recipe(), FINGERPRINTS)


def test_key_ignores_int_versus_float():
    as_int = ties_recipe(parameters={"lambda": 1})
    assert candidate_key(as_int, FINGERPRINTS) == candidate_key(ties_recipe(), FINGERPRINTS)


def test_key_ignores_negative_zero():
    first = Recipe(method="slerp", inputs=("model:a", "model:b"), base="model:a", parameters={"t": -0.0})
    second = Recipe(method="slerp", inputs=("model:a", "model:b"), base="model:a", parameters={"t": 0.0})
    assert candidate_key(first, FINGERPRINTS) == candidate_key(second, FINGERPRINTS)


def test_key_empty_input_parameters_same():
    first = Recipe(method="model_stock", inputs=("model:a", "model:b"), base="model:base", input_parameters=({}, {}))
    second = Recipe(method="model_stock", inputs=("model:a", "model:b"), base="model:base")
    assert candidate_key(first, FINGERPRINTS) == candidate_key(second, FINGERPRINTS)


@pytest.mark.parametrize(
    "changes",
    [
        {"parameters": {"lambda": 1.1}},
        {"input_parameters": ({"weight": 0.5, "density": 0.71}, {"weight": 0.3, "density": 0.4})},
        {"inputs": ("model:b", "model:a")},
        {"inputs": ("model:a", "model:a")},
        {"base": "model:a"},
        {"method": "dare_ties"},
        {"seed": 7},
    ],
    ids=["global", "per-input", "input-order", "duplicate-input", "base", "method", "seed"],
)
def test_key_changes_with_recipe(changes):
    assert candidate_key(ties_recipe(**changes), FINGERPRINTS) != candidate_key(ties_recipe(), FINGERPRINTS)


def test_key_changes_with_fingerprint():
    changed = dict(FINGERPRINTS, **{"model:b": "fp-b-retrained"})
    assert candidate_key(ties_recipe(), changed) != candidate_key(ties_recipe(), FINGERPRINTS)


def test_key_ignores_unused_fingerprint():
    extra = dict(FINGERPRINTS, **{"model:c": "fp-c"})
    assert candidate_key(ties_recipe(), extra) == candidate_key(ties_recipe(), FINGERPRINTS)


def test_key_changes_with_code_version(monkeypatch):
    before = candidate_key(ties_recipe(), FINGERPRINTS)
    monkeypatch.setattr(recipe_module, "MERGE_CODE_VERSION", "999")
    assert candidate_key(ties_recipe(), FINGERPRINTS) != before


def test_key_missing_fingerprint_named():
    with pytest.raises(ConfigError, match="model:b"):
        candidate_key(ties_recipe(), {"model:base": "fp-base", "model:a": "fp-a"})


def test_key_candidate_uses_own_key():
    child = Recipe(method="linear", inputs=("candidate:abc", "candidate:def"))
    other = Recipe(method="linear", inputs=("candidate:abc", "candidate:xyz"))
    assert candidate_key(child, {}) != candidate_key(other, {})


def test_key_nan_rejected():
    with pytest.raises(ConfigError, match="NaN or infinity"):
        candidate_key(ties_recipe(parameters={"lambda": float("nan")}), FINGERPRINTS)


def test_recipe_equality_and_hash():
    noisy = ties_recipe(input_parameters=({"weight": 0.50000000001, "density": 0.7}, {"weight": 0.3, "density": 0.4}))
    assert noisy == ties_recipe()
    assert len({noisy, ties_recipe()}) == 1


def test_recipe_json_round_trip():
    recipe = Recipe(
        method="dfs",
        inputs=("model:a", "model:b"),
        base="model:base",
        layer_path=(("model:a", 0, 1.0), ("model:b", 3, 0.8)),
    )
    restored = Recipe.model_validate(recipe.model_dump(mode="json"))
    assert restored == recipe
    assert restored.layer_path == (("model:a", 0, 1.0), ("model:b", 3, 0.8))


def test_parent_keys_in_order():
    recipe = Recipe(
        method="slerp", inputs=("candidate:k1", "candidate:k2"), base="candidate:k1", parameters={"t": 0.5}
    )
    assert recipe.parent_keys() == ["k1", "k2"]


def test_parent_keys_from_path():
    recipe = Recipe(
        method="dfs",
        inputs=("model:a", "candidate:k3"),
        base="model:a",
        layer_path=(("model:a", 0, 1.0), ("candidate:k3", 1, 1.0)),
    )
    assert recipe.parent_keys() == ["k3"]


# -- recipe_to_spec ----------------------------------------------------------------------


def test_spec_of_ties_recipe():
    spec = recipe_to_spec(ties_recipe(seed=5), resolve)
    assert spec.merge_method == "ties"
    assert spec.base_model == "/models/base"
    assert [entry.model for entry in spec.models] == ["/models/a", "/models/b"]
    assert spec.models[1].parameters == {"weight": 0.3, "density": 0.4}
    assert spec.parameters == {"lambda": 1.0}
    assert spec.seed == 5


def test_spec_of_slices():
    recipe = Recipe(
        method="passthrough",
        inputs=("model:a", "model:b"),
        base="model:base",
        slices=(("model:a", 0, 2, 1.0), ("model:b", 1, 4, 0.5)),
    )
    spec = recipe_to_spec(recipe, resolve)
    assert spec.models == []
    assert spec.slices[0].sources[0].layer_range == (0, 2)
    assert spec.slices[0].sources[0].parameters == {}
    assert spec.slices[1].sources[0].model == "/models/b"
    assert spec.slices[1].sources[0].parameters == {"scale": 0.5}


def test_spec_of_layer_path():
    recipe = Recipe(
        method="dfs",
        inputs=("model:a", "model:b"),
        base="model:base",
        layer_path=(("model:a", 0, 1.0), ("model:b", 3, 0.8)),
    )
    spec = recipe_to_spec(recipe, resolve)
    assert spec.embed_model == "/models/base"
    assert [(step.model, step.layer, step.scale) for step in spec.layer_path] == [
        ("/models/a", 0, 1.0),
        ("/models/b", 3, 0.8),
    ]


def test_spec_of_ps_dfs():
    recipe = Recipe(
        method="ps_dfs",
        inputs=("model:a", "model:b"),
        base="model:base",
        parameters={"ps_method": "ties", "lambda": 1.0},
        input_parameters=({"weight": 0.5}, {"weight": 0.5}),
        layer_path=(("ps", 0, 1.0), ("model:b", 1, 1.0)),
    )
    spec = recipe_to_spec(recipe, resolve)
    assert spec.ps_method == "ties"
    assert spec.parameters == {"lambda": 1.0}
    assert [entry.model for entry in spec.models] == ["/models/a", "/models/b"]
    assert spec.layer_path[0].model == "ps"
    assert spec.layer_path[1].model == "/models/b"
    assert spec.embed_model is None


# -- validate_recipe -----------------------------------------------------------------------


def test_validate_accepts_good_recipes():
    validate_recipe(ties_recipe(), MODEL_INFO)
    validate_recipe(ties_recipe(parameters={"lambda": [0.5, 1.0, 1.5, 1.0]}), MODEL_INFO)
    validate_recipe(ties_recipe(parameters={"lambda": [0.5]}), MODEL_INFO)
    validate_recipe(
        Recipe(method="linear", inputs=("candidate:k1", "candidate:k2"), parameters={"weight": 0.5}), MODEL_INFO
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "tiess"}, "did you mean 'ties'"),
        ({"parameters": {"lambda": 1.0, "temperature": 2.0}}, "unknown parameter 'temperature'"),
        ({"input_parameters": ({"weight": 0.5, "t": 0.2}, {"weight": 0.3})}, "unknown parameter 't' for input 0"),
        ({"input_parameters": ({"density": -0.1}, {"density": 0.5})}, r"density -0.1 is outside \[0, 1\]"),
        ({"input_parameters": ({"density": 1.5}, {"density": 0.5})}, r"density 1.5 is outside \[0, 1\]"),
        ({"parameters": {"weight": [0.1, 0.2, 0.3, 0.4, 0.5]}}, "has 5 entries but the model has 4 layers"),
        ({"parameters": {"weight": []}}, "empty gradient"),
        ({"input_parameters": ({"weight": 0.5},)}, "1 input_parameters entries for 2 inputs"),
        ({"inputs": ("model:a", "model:zeta")}, "unknown model 'zeta'"),
        ({"inputs": ("a", "model:b")}, "invalid reference 'a'"),
        ({"base": None}, "needs a base model"),
        ({"parameters": {"lambda": float("inf")}}, "give a finite value"),
    ],
    ids=[
        "method",
        "global-name",
        "input-name",
        "density-negative",
        "density-above-one",
        "gradient-long",
        "gradient-empty",
        "input-count",
        "model-name",
        "reference-form",
        "missing-base",
        "infinite",
    ],
)
def test_validate_rejects_bad_recipe(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate_recipe(ties_recipe(**changes), MODEL_INFO)


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ((("model:a", 0, 5, 1.0),), r"layer range \[0, 5\) of 'model:a' is empty or out of range"),
        ((("model:a", 2, 2, 1.0),), r"layer range \[2, 2\)"),
        ((("model:b", 0, 2, 1.0),), "slice 0 reads 'model:b', which is not among the inputs"),
        ((), "no slices"),
    ],
    ids=["out-of-range", "empty", "not-input", "none"],
)
def test_validate_rejects_bad_slice(slices, message):
    recipe = Recipe(method="passthrough", inputs=("model:a",), base="model:base", slices=slices)
    with pytest.raises(ConfigError, match=message):
        validate_recipe(recipe, MODEL_INFO)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ((("model:a", 4, 1.0),), "step 0 layer 4 of 'model:a' is out of range"),
        ((("model:a", 0, 0.0),), "step 0 scale 0.0 must be a positive finite number"),
        ((("model:a", 0, 1.0), ("model:b", 1, 1.0)), "step 1 reads 'model:b', which is not among the inputs"),
        ((("ps", 0, 1.0),), "only ps_dfs provides"),
        ((), "empty layer path"),
    ],
    ids=["layer", "scale", "not-input", "ps-in-dfs", "empty"],
)
def test_validate_rejects_bad_path(path, message):
    recipe = Recipe(method="dfs", inputs=("model:a",), base="model:base", layer_path=path)
    with pytest.raises(ConfigError, match=message):
        validate_recipe(recipe, MODEL_INFO)


def test_validate_missing_weight_named():
    recipe = Recipe(method="linear", inputs=("model:a", "model:b"), input_parameters=({"weight": 0.5}, {}))
    with pytest.raises(ConfigError, match="input 1 \\('model:b'\\) has no 'weight'"):
        validate_recipe(recipe, MODEL_INFO)


def test_validate_global_weight_suffices():
    recipe = Recipe(method="linear", inputs=("model:a", "model:b"), parameters={"weight": 0.5})
    validate_recipe(recipe, MODEL_INFO)


def test_validate_missing_slerp_t():
    recipe = Recipe(method="slerp", inputs=("model:a", "model:b"), base="model:a")
    with pytest.raises(ConfigError, match="missing parameter 't'"):
        validate_recipe(recipe, MODEL_INFO)


def test_validate_ps_dfs_method_checked():
    recipe = Recipe(
        method="ps_dfs",
        inputs=("model:a", "model:b"),
        base="model:base",
        parameters={"ps_method": "passthrough"},
        layer_path=(("ps", 0, 1.0),),
    )
    with pytest.raises(ConfigError, match="ps_method 'passthrough' is not a parameter-space method"):
        validate_recipe(recipe, MODEL_INFO)


def test_validate_ps_dfs_accepts_ps_parameters():
    recipe = Recipe(
        method="ps_dfs",
        inputs=("model:a", "model:b"),
        base="model:base",
        parameters={"ps_method": "ties", "lambda": 1.0},
        input_parameters=({"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}),
        layer_path=(("ps", 0, 1.0), ("model:b", 3, 1.2)),
    )
    validate_recipe(recipe, MODEL_INFO)

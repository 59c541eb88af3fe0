"""End-to-end merges of tiny Llama models through ``run_merge``, checked against the formulas."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from evomerge.exceptions import ConfigError, IncompatibleModelsError, MergeError
from evomerge.merge.engine import MergeOptions, merge_from_config, run_merge, tensor_generator
from evomerge.merge.registry import get_method
from evomerge.merge.spec import spec_from_dict
from evomerge.testing import make_tiny_family

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
Q_PROJ_0 = "model.layers.0.self_attn.q_proj.weight"
Q_PROJ_3 = "model.layers.3.self_attn.q_proj.weight"
UP_PROJ_1 = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Return [base, ft1, ft2, ft3]: a tiny Llama and three noisy fine-tunes of it."""
    return make_tiny_family(tmp_path_factory.mktemp("family"), count=3)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a single-file model folder."""
    return load_file(str(Path(path) / "model.safetensors"))


def config_of(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def clone_model(source: Path, target: Path, edit=None, config_update=None) -> Path:
    """Copy a model folder, rewriting its tensors with ``edit`` and its config with ``config_update``."""
    shutil.copytree(source, target)
    tensors = weights(source)
    if edit is not None:
        tensors = edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    if config_update:
        config = config_of(source)
        config.update(config_update)
        (target / "config.json").write_text(json.dumps(config))
    return target


def with_extra_rows(tensors: dict[str, torch.Tensor], rows: int, seed: int) -> dict[str, torch.Tensor]:
    """Append ``rows`` random vocabulary rows to the embedding and lm_head."""
    generator = torch.Generator().manual_seed(seed)
    result = dict(tensors)
    for name in (EMBED, HEAD):
        extra = torch.randn(rows, tensors[name].shape[1], generator=generator)
        result[name] = torch.cat([tensors[name], extra])
    return result


def spec(method, models, base=None, parameters=None, **extra):
    data = {"merge_method": method, "models": models, "parameters": parameters or {}, **extra}
    if base is not None:
        data["base_model"] = str(base)
    return spec_from_dict(data)


def entry(path, **parameters):
    return {"model": str(path), "parameters": parameters}


def test_linear_matches_formula(family, tmp_path):
    base, ft1, ft2, _ = family
    out = run_merge(spec("linear", [entry(ft1, weight=1.0), entry(ft2, weight=3.0)]), tmp_path / "out")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    expected = (weights(ft1)[UP_PROJ_1] + 3.0 * weights(ft2)[UP_PROJ_1]) / 4.0
    assert_close(model.state_dict()[UP_PROJ_1], expected)


def test_task_arithmetic_matches_formula(family, tmp_path):
    base, ft1, ft2, _ = family
    merge_spec = spec(
        "task_arithmetic", [entry(ft1, weight=0.5), entry(ft2, weight=1.5)], base=base, parameters={"lambda": 0.8}
    )
    out = weights(run_merge(merge_spec, tmp_path / "out"))
    b, x1, x2 = (weights(path)[Q_PROJ_3] for path in (base, ft1, ft2))
    assert_close(out[Q_PROJ_3], b + 0.8 * (0.5 * (x1 - b) + 1.5 * (x2 - b)))


def test_output_has_config_and_tokenizer(family, tmp_path):
    base, ft1, ft2, _ = family
    out = run_merge(spec("ties", [entry(ft1, weight=1.0), entry(ft2, weight=1.0)], base=base), tmp_path / "out")
    assert (out / "tokenizer.json").is_file()
    assert config_of(out)["model_type"] == "llama"
    assert config_of(out)["tie_word_embeddings"] is False


def test_slerp_gradient_over_layers(family, tmp_path):
    # t: [0, 1] gives t = 0 at layer 0 and for the embedding, t = 1 at layer 3 and for lm_head.
    base, ft1, _, _ = family
    merge_spec = spec("slerp", [entry(base), entry(ft1)], base=base, parameters={"t": [0.0, 1.0]})
    out = weights(run_merge(merge_spec, tmp_path / "out"))
    base_weights, ft1_weights = weights(base), weights(ft1)
    assert_close(out[Q_PROJ_0], base_weights[Q_PROJ_0])
    assert_close(out[Q_PROJ_3], ft1_weights[Q_PROJ_3])
    assert_close(out[EMBED], base_weights[EMBED])
    assert_close(out[HEAD], ft1_weights[HEAD])


def test_filter_selects_weight(family, tmp_path):
    base, ft1, _, _ = family
    weight = [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]
    out = weights(run_merge(spec("task_arithmetic", [entry(ft1, weight=weight)], base=base), tmp_path / "out"))
    assert_close(out[UP_PROJ_1], weights(base)[UP_PROJ_1])
    assert_close(out[Q_PROJ_3], weights(ft1)[Q_PROJ_3])


def test_per_model_overrides_global(family, tmp_path):
    base, ft1, ft2, _ = family
    merge_spec = spec(
        "linear", [entry(ft1, weight=3.0), entry(ft2)], parameters={"weight": 1.0, "normalize": False}
    )
    out = weights(run_merge(merge_spec, tmp_path / "out"))
    assert_close(out[UP_PROJ_1], 3.0 * weights(ft1)[UP_PROJ_1] + weights(ft2)[UP_PROJ_1])


def test_unknown_parameter_is_config_error(family, tmp_path):
    base, ft1, _, _ = family
    with pytest.raises(ConfigError, match="unknown parameter 'densty'.*'ties'.*did you mean 'density'"):
        run_merge(spec("ties", [entry(ft1, weight=1.0, densty=0.5)], base=base), tmp_path / "out")


def test_unknown_method_suggests_name(family, tmp_path):
    _, ft1, _, _ = family
    with pytest.raises(ConfigError, match="unknown merge method 'linaer': did you mean 'linear'"):
        run_merge(spec("linaer", [entry(ft1, weight=1.0)]), tmp_path / "out")


def test_missing_weight_is_config_error(family, tmp_path):
    _, ft1, ft2, _ = family
    with pytest.raises(ConfigError, match="has no 'weight' for merge method 'linear'"):
        run_merge(spec("linear", [entry(ft1, weight=1.0), entry(ft2)]), tmp_path / "out")


def test_missing_base_is_config_error(family, tmp_path):
    _, ft1, _, _ = family
    with pytest.raises(ConfigError, match="'ties' needs base_model"):
        run_merge(spec("ties", [entry(ft1, weight=1.0)]), tmp_path / "out")


def test_parameter_method_without_models(family, tmp_path):
    _, ft1, _, _ = family
    merge_spec = spec_from_dict(
        {"merge_method": "linear", "slices": [{"sources": [{"model": str(ft1), "layer_range": [0, 2]}]}]}
    )
    with pytest.raises(ConfigError, match="has no models"):
        run_merge(merge_spec, tmp_path / "out")


def test_normalize_zero_weight_sum(family, tmp_path):
    _, ft1, ft2, _ = family
    with pytest.raises(MergeError, match="weights sum to 0 under normalize=true"):
        run_merge(spec("linear", [entry(ft1, weight=1.0), entry(ft2, weight=-1.0)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_without_policy(family, tmp_path):
    _, ft1, ft2, _ = family
    big = clone_model(ft2, tmp_path / "big", lambda t: with_extra_rows(t, 16, 1), {"vocab_size": 336})
    with pytest.raises(IncompatibleModelsError, match="different vocabulary sizes.*tokenizer_source"):
        run_merge(spec("linear", [entry(ft1, weight=1.0), entry(big, weight=1.0)]), tmp_path / "out")


def test_vocab_base_policy_cuts_rows(family, tmp_path):
    base, ft1, ft2, _ = family
    big = clone_model(ft2, tmp_path / "big", lambda t: with_extra_rows(t, 16, 1), {"vocab_size": 336})
    merge_spec = spec(
        "linear", [entry(ft1, weight=1.0), entry(big, weight=1.0)], base=base, tokenizer_source="base"
    )
    out = run_merge(merge_spec, tmp_path / "out")
    merged = weights(out)[EMBED]
    assert merged.shape[0] == 320
    assert_close(merged, (weights(ft1)[EMBED] + weights(ft2)[EMBED]) / 2)
    assert config_of(out)["vocab_size"] == 320


def test_vocab_base_policy_fills_rows(family, tmp_path):
    # ft1 lacks the last 20 rows, which are taken from the base before the task vectors are formed.
    base, ft1, ft2, _ = family
    small = clone_model(
        ft1,
        tmp_path / "small",
        lambda t: {**t, EMBED: t[EMBED][:300], HEAD: t[HEAD][:300]},
        {"vocab_size": 300},
    )
    merge_spec = spec(
        "task_arithmetic", [entry(small, weight=1.0), entry(ft2, weight=1.0)], base=base, tokenizer_source="base"
    )
    merged = weights(run_merge(merge_spec, tmp_path / "out"))[HEAD]
    b, x1, x2 = (weights(path)[HEAD] for path in (base, ft1, ft2))
    assert merged.shape[0] == 320
    assert_close(merged[:300], x1[:300] + x2[:300] - b[:300])
    assert_close(merged[300:], x2[300:])


def test_vocab_union_policy(family, tmp_path):
    _, ft1, ft2, _ = family
    big = clone_model(ft2, tmp_path / "big", lambda t: with_extra_rows(t, 16, 1), {"vocab_size": 336})
    tokenizer_config = json.loads((big / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 777
    (big / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    merge_spec = spec("linear", [entry(ft1, weight=1.0), entry(big, weight=3.0)], tokenizer_source="union")
    out = run_merge(merge_spec, tmp_path / "out")
    merged = weights(out)[EMBED]
    big_embed = weights(big)[EMBED]
    assert merged.shape[0] == 336
    assert_close(merged[:320], (weights(ft1)[EMBED] + 3.0 * big_embed[:320]) / 4.0)
    assert_close(merged[320:], big_embed[320:])
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 777
    assert config_of(out)["vocab_size"] == 336


def test_vocab_model_path_policy(family, tmp_path):
    # The tokenizer model is not an input: its extra rows fill both inputs, so they pass through unchanged.
    _, ft1, ft2, ft3 = family
    big = clone_model(ft3, tmp_path / "big", lambda t: with_extra_rows(t, 16, 3), {"vocab_size": 336})
    tokenizer_config = json.loads((big / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 555
    (big / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    merge_spec = spec("linear", [entry(ft1, weight=1.0), entry(ft2, weight=1.0)], tokenizer_source=str(big))
    out = run_merge(merge_spec, tmp_path / "out")
    merged = weights(out)[HEAD]
    assert merged.shape[0] == 336
    assert_close(merged[:320], (weights(ft1)[HEAD] + weights(ft2)[HEAD]) / 2)
    assert_close(merged[320:], weights(big)[HEAD][320:])
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 555


def test_vocab_union_with_base(family, tmp_path):
    # Rows 320..335 exist only in the larger model, so they are copied from it.
    base, ft1, ft2, _ = family
    big = clone_model(ft2, tmp_path / "big", lambda t: with_extra_rows(t, 16, 2), {"vocab_size": 336})
    merge_spec = spec(
        "task_arithmetic", [entry(ft1, weight=1.0), entry(big, weight=0.5)], base=base, tokenizer_source="union"
    )
    merged = weights(run_merge(merge_spec, tmp_path / "out"))[EMBED]
    b, x1, x2 = (weights(path)[EMBED] for path in (base, ft1, big))
    assert merged.shape[0] == 336
    assert_close(merged[:320], b + (x1 - b) + 0.5 * (x2[:320] - b))
    assert_close(merged[320:], x2[320:])


def test_layer_method_dispatch(family, tmp_path):
    _, ft1, _, _ = family
    merge_spec = spec_from_dict(
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(ft1), "layer_range": [0, 2]}]}]}
    )
    out = run_merge(merge_spec, tmp_path / "out")
    assert config_of(out)["num_hidden_layers"] == 2


def test_all_tied_output_tied(family, tmp_path):
    _, ft1, ft2, _ = family
    untie = lambda t: {name: value for name, value in t.items() if name != HEAD}  # noqa: E731
    tied1 = clone_model(ft1, tmp_path / "tied1", untie, {"tie_word_embeddings": True})
    tied2 = clone_model(ft2, tmp_path / "tied2", untie, {"tie_word_embeddings": True})
    out = run_merge(spec("linear", [entry(tied1, weight=1.0), entry(tied2, weight=1.0)]), tmp_path / "out")
    assert HEAD not in weights(out)
    assert config_of(out)["tie_word_embeddings"] is True


def test_mixed_tied_output_untied(family, tmp_path):
    _, ft1, ft2, _ = family
    untie = lambda t: {name: value for name, value in t.items() if name != HEAD}  # noqa: E731
    tied = clone_model(ft2, tmp_path / "tied", untie, {"tie_word_embeddings": True})
    out = run_merge(spec("linear", [entry(tied, weight=1.0), entry(ft1, weight=1.0)]), tmp_path / "out")
    merged = weights(out)
    assert_close(merged[HEAD], (weights(ft2)[EMBED] + weights(ft1)[HEAD]) / 2)
    assert config_of(out)["tie_word_embeddings"] is False


def test_fp16_inputs_merge_in_float32(family, tmp_path):
    base, ft1, ft2, _ = family
    to_half = lambda t: {name: value.half() for name, value in t.items()}  # noqa: E731
    half = [clone_model(path, tmp_path / path.name, to_half, {"dtype": "float16"}) for path in (base, ft1, ft2)]
    merge_spec = spec("task_arithmetic", [entry(half[1], weight=1.0), entry(half[2], weight=1.0)], base=half[0])
    merged = weights(run_merge(merge_spec, tmp_path / "out"))[Q_PROJ_3]
    b, x1, x2 = (weights(path)[Q_PROJ_3].float() for path in half)
    assert merged.dtype == torch.float16
    assert_close(merged, (x1 + x2 - b).half())


def test_out_dtype_option(family, tmp_path):
    _, ft1, ft2, _ = family
    options = MergeOptions(out_dtype="bfloat16")
    out = run_merge(spec("linear", [entry(ft1, weight=1.0), entry(ft2, weight=1.0)]), tmp_path / "out", options)
    assert weights(out)[Q_PROJ_3].dtype == torch.bfloat16


def test_same_model_twice_counts_twice(family, tmp_path):
    _, ft1, ft2, _ = family
    models = [entry(ft1, weight=1.0), entry(ft1, weight=1.0), entry(ft2, weight=1.0)]
    out = weights(run_merge(spec("linear", models), tmp_path / "out"))
    assert_close(out[UP_PROJ_1], (2 * weights(ft1)[UP_PROJ_1] + weights(ft2)[UP_PROJ_1]) / 3)


def test_density_zero_gives_base(family, tmp_path):
    base, ft1, ft2, _ = family
    models = [entry(ft1, weight=1.0, density=0.0), entry(ft2, weight=1.0, density=0.0)]
    out = weights(run_merge(spec("dare_ties", models, base=base), tmp_path / "out"))
    assert_close(out[Q_PROJ_3], weights(base)[Q_PROJ_3])


def test_density_one_keeps_all(family, tmp_path):
    base, ft1, ft2, _ = family
    models = [entry(ft1, weight=1.0, density=1.0), entry(ft2, weight=0.5, density=1.0)]
    out = weights(run_merge(spec("dare_linear", models, base=base), tmp_path / "out"))
    b, x1, x2 = (weights(path)[Q_PROJ_3] for path in (base, ft1, ft2))
    assert_close(out[Q_PROJ_3], b + (x1 - b) + 0.5 * (x2 - b))


def test_dare_seed_reproducible(family, tmp_path):
    base, ft1, ft2, _ = family
    models = [entry(ft1, weight=1.0, density=0.5), entry(ft2, weight=1.0, density=0.5)]
    first = weights(run_merge(spec("dare_ties", models, base=base, seed=7), tmp_path / "first"))
    second = weights(run_merge(spec("dare_ties", models, base=base, seed=7), tmp_path / "second"))
    other = weights(run_merge(spec("dare_ties", models, base=base, seed=8), tmp_path / "other"))
    assert torch.equal(first[Q_PROJ_3], second[Q_PROJ_3])
    assert not torch.equal(first[Q_PROJ_3], other[Q_PROJ_3])


def test_nan_input_names_model_and_tensor(family, tmp_path):
    _, ft1, ft2, _ = family

    def poison(tensors):
        tensors[UP_PROJ_1][0, 0] = float("nan")
        return tensors

    bad = clone_model(ft2, tmp_path / "bad", poison)
    with pytest.raises(MergeError, match=f"{UP_PROJ_1}.*{bad.name}.*NaN or inf"):
        run_merge(spec("linear", [entry(ft1, weight=1.0), entry(bad, weight=1.0)]), tmp_path / "out")


def test_missing_tensor_is_named(family, tmp_path):
    _, ft1, ft2, _ = family
    short = clone_model(ft2, tmp_path / "short", lambda t: {k: v for k, v in t.items() if k != UP_PROJ_1})
    with pytest.raises(IncompatibleModelsError, match=f"no tensor '{UP_PROJ_1}'"):
        run_merge(spec("linear", [entry(ft1, weight=1.0), entry(short, weight=1.0)]), tmp_path / "out")


def test_architecture_mismatch(family, tmp_path):
    _, ft1, ft2, _ = family
    other = clone_model(ft2, tmp_path / "other", config_update={"model_type": "mistral"})
    with pytest.raises(IncompatibleModelsError, match="model_type 'mistral'"):
        run_merge(spec("linear", [entry(ft1, weight=1.0), entry(other, weight=1.0)]), tmp_path / "out")


MERGEKIT_CONFIGS = {
    "linear": "models:\n  - model: {ft1}\n    parameters: {{weight: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\n",
    "slerp": (
        "base_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\nparameters:\n  t:\n"
        "    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n"
        "    - value: 0.5\n"
    ),
    "nuslerp": "models:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: 2.0}}\n",
    "task_arithmetic": "base_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: 0.3}}\n",
    "ties": (
        "base_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\n    parameters: {{density: 0.5, weight: 0.5}}\n"
        "  - model: {ft2}\n    parameters: {{density: [1, 0.7, 0.1], weight: 0.5}}\nparameters:\n  normalize: true\n  int8_mask: true\n"
    ),
    "dare_linear": "base_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.6}}\nseed: 3\n",
    "dare_ties": "base_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.6}}\nseed: 3\n",
    "breadcrumbs": "base_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.8, gamma: 0.05}}\n",
    "breadcrumbs_ties": "base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}\n",
    "della": "base_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}\n  - model: {ft2}\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}\nparameters: {{lambda: 0.9}}\n",
    "della_linear": "base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{weight: 0.5, density: 0.5, epsilon: 0.2, lambda: 1.1}}\n",
    "model_stock": "base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {ft3}\n",
}


@pytest.mark.parametrize("method", sorted(MERGEKIT_CONFIGS))
def test_mergekit_config_each_method(method, family, tmp_path):
    base, ft1, ft2, ft3 = family
    text = f"merge_method: {method}\ndtype: float32\n" + MERGEKIT_CONFIGS[method].format(
        base=base, ft1=ft1, ft2=ft2, ft3=ft3
    )
    config_path = tmp_path / "merge.yaml"
    config_path.write_text(text)
    merge_spec = spec_from_dict(yaml.safe_load(text))
    out = weights(merge_from_config(config_path, tmp_path / "out"))

    # Recompute one layer tensor with the method's own function, as the engine should have called it.
    method_entry = get_method(method)
    models = [item for item in merge_spec.models if not (method_entry.uses_base and item.model == str(base))]
    inputs = [weights(Path(item.model))[Q_PROJ_3] for item in models]
    base_tensor = weights(base)[Q_PROJ_3] if method_entry.uses_base and merge_spec.base_model else None
    per_model = []
    for item in models:
        values = {**merge_spec.parameters, **item.parameters}
        per_model.append({name: values.get(name, method_entry.defaults.get(name)) for name in method_entry.per_model_parameters})
    if method == "ties":
        per_model[1]["density"] = 0.1  # the gradient [1, 0.7, 0.1] ends at 0.1 on the last layer
    if method == "slerp":
        options = {"t": 1.0}  # the self_attn gradient ends at 1 on the last layer
    else:
        options = {
            name: merge_spec.parameters.get(name, method_entry.defaults.get(name)) for name in method_entry.global_parameters
        }
    expected = method_entry.merge_tensor(inputs, base_tensor, per_model, options, tensor_generator(merge_spec.seed or 0, Q_PROJ_3))
    assert_close(out[Q_PROJ_3], expected)


def test_integer_tensor_passes_through_copied(family, tmp_path):
    # Integer tensors are not merged: the reference model's tensor is written as it is, from a copy.
    base, ft1, ft2, _ = family
    positions = torch.arange(64, dtype=torch.int64)

    def with_positions(tensors):
        return {**tensors, "model.position_ids": positions}

    first = clone_model(ft1, tmp_path / "ft1", edit=with_positions)
    second = clone_model(ft2, tmp_path / "ft2", edit=with_positions)
    out = weights(run_merge(spec("linear", [entry(first, weight=1.0), entry(second, weight=1.0)]), tmp_path / "out"))

    assert out["model.position_ids"].dtype == torch.int64
    assert torch.equal(out["model.position_ids"], positions)
    assert_close(out[UP_PROJ_1], (weights(ft1)[UP_PROJ_1] + weights(ft2)[UP_PROJ_1]) / 2)

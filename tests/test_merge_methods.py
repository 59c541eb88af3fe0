"""Hand-computed cases for every parameter-space merge method, the registry and parameter resolution."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from evomerge.exceptions import ConfigError, MergeError
from evomerge.merge.linear import nuslerp, slerp
from evomerge.merge.parameters import interpolate_gradient, layer_position, resolve_parameters, resolve_value
from evomerge.merge.registry import MERGE_TECHNIQUES, get_method
from evomerge.merge import task_vectors
from evomerge.merge.task_vectors import magnitude_prune, outlier_prune, random_drop, rank_magnitude_drop


def merge(method_name, inputs, base=None, per_model=None, options=None, seed=0):
    """Run one registered method with its defaults filled in, as the engine does."""
    method = get_method(method_name)
    per_model = per_model or [{} for _ in inputs]
    filled_models = [
        {**{k: v for k, v in method.defaults.items() if k in method.per_model_parameters}, **p} for p in per_model
    ]
    filled_options = {
        **{k: v for k, v in method.defaults.items() if k in method.global_parameters},
        **(options or {}),
    }
    generator = torch.Generator().manual_seed(seed)
    return method.merge_tensor(inputs, base, filled_models, filled_options, generator)


A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
B = torch.tensor([[3.0, 2.0, 1.0], [0.0, -1.0, 2.0]])
BASE = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
# Task vectors of the TIES case, laid out as 2x3 tensors.
D1 = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.1, -1.0]])
D2 = torch.tensor([[-3.0, 1.0, 1.5], [2.0, -0.5, 0.2]])


def test_linear_normalized_weights():
    result = merge("linear", [A, B], per_model=[{"weight": 1.0}, {"weight": 3.0}])
    expected = torch.tensor([[2.5, 2.0, 1.5], [1.0, 0.5, 3.0]])
    assert_close(result, expected)


def test_linear_without_normalize():
    result = merge("linear", [A, B], per_model=[{"weight": 1.0}, {"weight": 3.0}], options={"normalize": False})
    assert_close(result, A + 3 * B)


def test_linear_zero_weight_sum():
    with pytest.raises(MergeError, match="weights sum to 0 under normalize=true"):
        merge("linear", [A, B], per_model=[{"weight": 1.0}, {"weight": -1.0}])


def test_slerp_orthogonal_midpoint():
    result = slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert_close(result, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_quarter_angle():
    # theta = pi/2, so t = 1/3 rotates by pi/6: weights sin(pi/3) and sin(pi/6).
    result = slerp(1 / 3, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert_close(result, torch.tensor([2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]))


@pytest.mark.parametrize(
    "start,end,expected",
    [
        ([1.0, 2.0], [1.0, 2.0], [1.0, 2.0]),
        ([1.0, 2.0], [2.0, 4.0], [1.25, 2.5]),
        ([1.0, 0.0], [-1.0, 0.0], [0.5, 0.0]),
        ([0.0, 0.0], [4.0, 8.0], [1.0, 2.0]),
    ],
    ids=["identical", "parallel", "opposite", "zero"],
)
def test_slerp_degenerate_falls_back_to_lerp(start, end, expected):
    result = slerp(0.25, torch.tensor(start), torch.tensor(end))
    assert_close(result, torch.tensor(expected))


def test_slerp_method_uses_base_as_start():
    start = torch.tensor([[1.0, 0.0]])
    end = torch.tensor([[0.0, 1.0]])
    result = merge("slerp", [end], base=start, options={"t": 0.0})
    assert_close(result, start)


def test_slerp_method_rejects_three_models():
    with pytest.raises(MergeError, match="exactly two models"):
        merge("slerp", [A, B], base=BASE, options={"t": 0.5})


def test_nuslerp_weights_set_t():
    # weights 1 and 3 give t = 0.75: rotation by 3*pi/8 from the first vector.
    first = torch.tensor([[1.0, 0.0]])
    second = torch.tensor([[0.0, 1.0]])
    result = merge("nuslerp", [first, second], per_model=[{"weight": 1.0}, {"weight": 3.0}])
    angle = 0.75 * math.pi / 2
    assert_close(result, torch.tensor([[math.cos(angle), math.sin(angle)]]))


def test_nuslerp_with_base_slerps_task_vectors():
    base = torch.tensor([[1.0, 1.0]])
    first = torch.tensor([[2.0, 1.0]])
    second = torch.tensor([[1.0, 2.0]])
    result = merge("nuslerp", [first, second], base=base, per_model=[{"weight": 1.0}, {"weight": 1.0}])
    assert_close(result, torch.tensor([[1.0 + math.sqrt(0.5), 1.0 + math.sqrt(0.5)]]))


def test_nuslerp_row_wise_vectors_along_dim0():
    # Row-wise: each column [x, y] is slerped on its own; column 1 is parallel and lerped.
    start = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    end = torch.tensor([[0.0, 2.0], [1.0, 2.0]])
    result = nuslerp(0.5, start, end, flatten=False, row_wise=True)
    expected = torch.tensor([[math.sqrt(0.5), 1.5], [math.sqrt(0.5), 1.5]])
    assert_close(result, expected)


def test_nuslerp_vectors_along_last_dim():
    start = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    end = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    result = nuslerp(0.5, start, end, flatten=False, row_wise=False)
    expected = torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [1.5, 1.5]])
    assert_close(result, expected)


def test_task_arithmetic_weighted_sum():
    result = merge(
        "task_arithmetic",
        [BASE + D1, BASE + D2],
        base=BASE,
        per_model=[{"weight": 0.5}, {"weight": 2.0}],
        options={"lambda": 2.0},
    )
    assert_close(result, BASE + 2.0 * (0.5 * D1 + 2.0 * D2))


def test_task_arithmetic_normalized():
    result = merge(
        "task_arithmetic",
        [BASE + D1, BASE + D2],
        base=BASE,
        per_model=[{"weight": 1.0}, {"weight": 3.0}],
        options={"normalize": True},
    )
    assert_close(result, BASE + (D1 + 3.0 * D2) / 4.0)


def test_task_arithmetic_zero_weight_sum():
    with pytest.raises(MergeError, match="weights sum to 0 under normalize=true"):
        merge(
            "task_arithmetic",
            [BASE + D1, BASE + D2],
            base=BASE,
            per_model=[{"weight": 2.0}, {"weight": -2.0}],
            options={"normalize": True},
        )


def test_ties_trim_elect_disjoint_mean():
    # Trimmed at density 0.5 (3 of 6): D1 -> [0,-2,3,0,0,-1], D2 -> [-3,0,1.5,2,0,0].
    # Weighted by 1 and 2 the column sums are [-6,-2,6,4,0,-1], electing signs [-,-,+,+,+,-].
    result = merge(
        "ties",
        [BASE + D1, BASE + D2],
        base=BASE,
        per_model=[{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}],
    )
    expected_delta = torch.tensor([[-3.0, -2.0, 2.0], [2.0, 0.0, -1.0]])
    assert_close(result, BASE + expected_delta)


def test_ties_without_normalize_and_lambda():
    result = merge(
        "ties",
        [BASE + D1, BASE + D2],
        base=BASE,
        per_model=[{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}],
        options={"normalize": False, "lambda": 0.5},
    )
    expected_delta = 0.5 * torch.tensor([[-6.0, -2.0, 6.0], [4.0, 0.0, -1.0]])
    assert_close(result, BASE + expected_delta)


def test_ties_density_zero_gives_base():
    result = merge("ties", [BASE + D1, BASE + D2], base=BASE, per_model=[{"weight": 1.0, "density": 0.0}] * 2)
    assert_close(result, BASE)


def test_ties_density_one_keeps_all():
    # With every entry kept, column 0 elects '-' (1 - 3 < 0): only D2 counts there.
    result = merge("ties", [BASE + D1, BASE + D2], base=BASE, per_model=[{"weight": 1.0, "density": 1.0}] * 2)
    assert_close(result[0, 0], BASE[0, 0] - 3.0)
    assert_close(result[0, 2], BASE[0, 2] + 2.25)


def test_magnitude_prune_small_tensor_keeps_one():
    result = magnitude_prune(torch.tensor([0.5, -2.0, 1.0]), density=0.1)
    assert_close(result, torch.tensor([0.0, -2.0, 0.0]))


def test_magnitude_prune_rescale_keeps_l1():
    result = magnitude_prune(torch.tensor([1.0, -3.0, 0.0, 4.0]), density=0.5, rescale=True)
    assert_close(result, torch.tensor([0.0, -3.0, 0.0, 4.0]) * (8.0 / 7.0))


def test_dare_keeps_and_rescales():
    delta = torch.ones(4000)
    generator = torch.Generator().manual_seed(3)
    result = random_drop(delta, density=0.25, rescale=True, generator=generator)
    kept = int((result != 0).sum())
    assert set(result.unique().tolist()) == {0.0, 4.0}
    assert 850 <= kept <= 1150


def test_dare_without_rescale():
    generator = torch.Generator().manual_seed(3)
    result = random_drop(torch.ones(100), density=0.5, rescale=False, generator=generator)
    assert set(result.unique().tolist()) == {0.0, 1.0}


def test_dare_linear_density_one_equals_sum():
    result = merge(
        "dare_linear",
        [BASE + D1, BASE + D2],
        base=BASE,
        per_model=[{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}],
    )
    assert_close(result, BASE + D1 + 0.5 * D2)


def test_dare_ties_same_seed_same_result():
    inputs = [BASE + D1, BASE + D2]
    per_model = [{"weight": 1.0, "density": 0.5}] * 2
    first = merge("dare_ties", inputs, base=BASE, per_model=per_model, seed=11)
    second = merge("dare_ties", inputs, base=BASE, per_model=per_model, seed=11)
    assert torch.equal(first, second)


def test_dare_ties_entries_follow_consensus():
    # Each entry is 0, or a kept delta divided by density 0.5, or a sum of kept deltas of the elected sign.
    big_base = torch.zeros(2000)
    delta = torch.ones(2000)
    result = merge(
        "dare_ties",
        [big_base + delta, big_base - delta],
        base=big_base,
        per_model=[{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}],
        seed=5,
    )
    assert set(result.unique().tolist()) <= {-2.0, 0.0, 2.0}
    assert (result == 2.0).any()
    assert (result == -2.0).any()


def test_breadcrumbs_drops_outliers_and_small():
    delta = torch.tensor([0.1, -5.0, 2.0, -0.3, 1.0, 0.05, 3.0, -0.2, 0.4, 0.6])
    result = outlier_prune(delta, density=0.5, gamma=0.1)
    assert_close(result, torch.tensor([0.0, 0.0, 2.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.4, 0.6]))


def test_breadcrumbs_method_weighted_sum():
    base = torch.zeros(10)
    delta = torch.tensor([0.1, -5.0, 2.0, -0.3, 1.0, 0.05, 3.0, -0.2, 0.4, 0.6])
    result = merge("breadcrumbs", [base + delta], base=base, per_model=[{"weight": 2.0, "density": 0.5, "gamma": 0.1}])
    assert_close(result, 2.0 * torch.tensor([0.0, 0.0, 2.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.4, 0.6]))


def test_breadcrumbs_gamma_shrinks_to_fit_density():
    # density 0.9 keeps 9 of 10, so at most 1 large entry can go even with gamma 0.5.
    delta = torch.arange(1.0, 11.0)
    result = outlier_prune(delta, density=0.9, gamma=0.5)
    assert_close(result, torch.cat([torch.arange(1.0, 10.0), torch.zeros(1)]))


def test_breadcrumbs_ties_consensus():
    base = torch.zeros(4)
    first = torch.tensor([4.0, -1.0, 2.0, 0.5])
    second = torch.tensor([-1.0, -3.0, 0.25, 1.0])
    # density 1 keeps everything; elected signs are [+, -, +, +].
    result = merge(
        "breadcrumbs_ties",
        [first, second],
        base=base,
        per_model=[{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}],
    )
    assert_close(result, torch.tensor([4.0, -4.0, 2.25, 1.5]))


def test_della_keep_probability_by_rank():
    # Row magnitudes 1..101: rank r keeps with p = 0.1 + 0.8 * r / 100.
    rows = torch.arange(1.0, 102.0).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    result = rank_magnitude_drop(rows, density=0.5, epsilon=0.4, rescale=True, generator=generator)
    kept_fraction = (result != 0).float().mean(dim=0)
    assert abs(kept_fraction[0].item() - 0.1) < 0.03
    assert abs(kept_fraction[50].item() - 0.5) < 0.03
    assert abs(kept_fraction[100].item() - 0.9) < 0.03


def test_della_rescales_by_keep_probability():
    rows = torch.arange(1.0, 102.0).repeat(200, 1)
    generator = torch.Generator().manual_seed(0)
    result = rank_magnitude_drop(rows, density=0.5, epsilon=0.4, rescale=True, generator=generator)
    kept_smallest = result[:, 0][result[:, 0] != 0]
    kept_largest = result[:, 100][result[:, 100] != 0]
    assert_close(kept_smallest, torch.full_like(kept_smallest, 1.0 / 0.1))
    assert_close(kept_largest, torch.full_like(kept_largest, 101.0 / 0.9))


def test_della_invalid_epsilon():
    with pytest.raises(MergeError, match="epsilon 0.3 with density 0.8"):
        rank_magnitude_drop(torch.ones(2, 3), density=0.8, epsilon=0.3)


def test_della_density_one_is_task_arithmetic():
    result = merge(
        "della_linear",
        [BASE + D1, BASE + D2],
        base=BASE,
        per_model=[{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}],
        options={"lambda": 0.5},
    )
    assert_close(result, BASE + 0.5 * (D1 + D2))


def test_della_density_zero_gives_base():
    result = merge("della", [BASE + D1, BASE + D2], base=BASE, per_model=[{"weight": 1.0, "density": 0.0}] * 2)
    assert_close(result, BASE)


def test_model_stock_orthogonal_keeps_base():
    base = torch.tensor([1.0, 1.0])
    result = merge("model_stock", [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])], base=base)
    assert_close(result, base)


def test_model_stock_45_degree_ratio():
    # cos = 1/sqrt(2), N = 2: t = 2c / (1 + c) = 0.828427; average of [1,0] and [1,1] is [1, 0.5].
    base = torch.zeros(2)
    result = merge("model_stock", [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], base=base)
    cosine = 1 / math.sqrt(2)
    ratio = 2 * cosine / (1 + cosine)
    assert_close(result, torch.tensor([ratio, 0.5 * ratio]))


def test_model_stock_needs_two_models():
    with pytest.raises(MergeError, match="at least two models"):
        merge("model_stock", [A], base=BASE)


def test_registry_lists_every_method():
    expected = {
        "linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough", "frankenmerge", "dfs", "ps_dfs",
    }
    assert set(MERGE_TECHNIQUES) == expected


def test_registry_layer_methods_have_no_function():
    assert MERGE_TECHNIQUES["dfs"].kind == "layer"
    assert MERGE_TECHNIQUES["dfs"].merge_tensor is None


def test_get_method_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean 'dare_ties'"):
        get_method("dare_tie")


def test_unknown_parameter_names_method():
    method = get_method("ties")
    with pytest.raises(ConfigError, match="unknown parameter 'densty'.*'ties'.*did you mean 'density'"):
        method.check_parameter_names(["densty"], per_model=True, model="ft1")


def test_gradient_interpolates_between_points():
    assert interpolate_gradient([0.0, 1.0, 0.0], 0.25) == pytest.approx(0.5)


def test_gradient_endpoints():
    assert interpolate_gradient([0.2, 0.4, 0.8], 1.0) == pytest.approx(0.8)


def test_layer_position_of_layers_and_others():
    assert layer_position("model.layers.2.mlp.up_proj.weight", 5) == pytest.approx(0.5)
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("model.norm.weight", 5) == 1.0
    assert layer_position("lm_head.weight", 5) == 1.0


def test_conditional_first_match_wins():
    value = [{"value": 0.1}, {"filter": "self_attn", "value": 0.7}, {"filter": "attn", "value": 0.3}]
    assert resolve_value(value, "model.layers.0.self_attn.q_proj.weight", 4) == pytest.approx(0.7)


def test_conditional_fallback_and_gradient():
    value = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.25}]
    assert resolve_value(value, "model.layers.3.self_attn.q_proj.weight", 4) == pytest.approx(0.25)
    assert resolve_value(value, "model.layers.3.mlp.up_proj.weight", 4) == pytest.approx(1.0)


def test_conditional_without_match_is_unset():
    assert resolve_value([{"filter": "mlp", "value": 0.5}], "model.norm.weight", 4) is None


def test_per_model_overrides_global():
    resolved = resolve_parameters(
        {"weight", "density"},
        {"weight": 2.0},
        "model.layers.0.mlp.up_proj.weight",
        4,
        defaults={"density": 1.0},
        fallbacks={"weight": 1.0, "density": [0.2, 0.8]},
    )
    assert resolved["weight"] == 2.0
    assert resolved["density"] == pytest.approx(0.2)


# --- Large tensors: sampled selection and blockwise merging -------------------


def reference_window(magnitudes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Keep mask of the ranks [start, stop) of a stable ascending sort, computed the slow way."""
    order = torch.argsort(magnitudes.reshape(-1), stable=True)
    keep = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    keep[order[start:stop]] = True
    return keep.reshape(magnitudes.shape)


def reference_task_vectors(inputs, base, weights, densities, consensus, normalize=True, scale=1.0):
    """TIES or task arithmetic over whole tensors, with stable-sort magnitude trimming."""
    deltas = []
    for tensor, density in zip(inputs, densities):
        delta = tensor - base
        count = delta.numel()
        if density < 1.0:
            kept = max(1, int(density * count))
            delta = delta * reference_window(delta.abs(), count - kept, count)
        deltas.append(delta)
    weighted = torch.stack([weight * delta for weight, delta in zip(weights, deltas)])
    column = torch.tensor(weights).reshape((-1,) + (1,) * base.dim())
    if consensus:
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        agree = (torch.sign(weighted) == elected).float()
        merged = (weighted * agree).sum(dim=0)
        divisor = (column * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = weighted.sum(dim=0)
        divisor = column.sum()
    return base + scale * (merged / divisor if normalize else merged)


@pytest.mark.parametrize("levels", [None, 7], ids=["distinct", "many-equal"])
@pytest.mark.parametrize("density", [0.013, 0.5, 0.97])
def test_magnitude_prune_large_matches_sort(levels, density):
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(300, 1100, generator=generator)
    if levels is not None:
        # Few distinct magnitudes put thousands of equal values at the cut-off.
        delta = torch.randint(-levels, levels + 1, delta.shape, generator=generator).float()
    kept = int(density * delta.numel())
    expected = delta * reference_window(delta.abs(), delta.numel() - kept, delta.numel())
    assert torch.equal(magnitude_prune(delta, density), expected)


@pytest.mark.parametrize("levels", [None, 5], ids=["distinct", "many-equal"])
def test_outlier_prune_large_matches_sort(levels):
    generator = torch.Generator().manual_seed(2)
    delta = torch.randn(200_000, generator=generator)
    if levels is not None:
        delta = torch.randint(-levels, levels + 1, delta.shape, generator=generator).float()
    count = delta.numel()
    kept, top = int(0.6 * count), int(0.05 * count)
    expected = delta * reference_window(delta.abs(), count - kept - top, count - top)
    assert torch.equal(outlier_prune(delta, density=0.6, gamma=0.05), expected)


def test_selection_fallback_when_bracket_misses(monkeypatch):
    # A zero-width bracket around the sample quantile misses the rank, so the whole tensor is searched.
    monkeypatch.setattr(task_vectors, "BRACKET_DEVIATIONS", 0.0)
    delta = torch.randn(150_000, generator=torch.Generator().manual_seed(3))
    kept = int(0.3 * delta.numel())
    expected = delta * reference_window(delta.abs(), delta.numel() - kept, delta.numel())
    assert torch.equal(magnitude_prune(delta, 0.3), expected)


@pytest.mark.parametrize("method,consensus", [("ties", True), ("task_arithmetic", False)])
@pytest.mark.parametrize("levels", [None, 9], ids=["distinct", "many-equal"])
def test_blockwise_merge_matches_formula(monkeypatch, method, consensus, levels):
    # Small blocks make a 70000-entry tensor span many blocks, with equal magnitudes split across them.
    monkeypatch.setattr(task_vectors, "CPU_BLOCK_SIZE", 4096)
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(350, 200, generator=generator)
    if levels is None:
        deltas = [torch.randn(base.shape, generator=generator) for _ in range(3)]
    else:
        deltas = [torch.randint(-levels, levels + 1, base.shape, generator=generator).float() for _ in range(3)]
    weights, densities = [0.5, 1.5, 1.0], [0.3, 0.5, 1.0]
    if not consensus:
        densities = [1.0, 1.0, 1.0]
    inputs = [base + delta for delta in deltas]
    result = merge(
        method,
        inputs,
        base=base,
        per_model=[{"weight": weight, "density": density} for weight, density in zip(weights, densities)],
        options={"normalize": True, "lambda": 0.8},
    )
    expected = reference_task_vectors(inputs, base, weights, densities, consensus, scale=0.8)
    assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_ties_cancelling_deltas_elect_positive():
    # 1 * 2 + 2 * (-1) = 0 elects '+', so only the first model agrees there.
    base = torch.zeros(3)
    result = merge(
        "ties",
        [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0])],
        base=base,
        per_model=[{"weight": 1.0, "density": 1.0}, {"weight": 2.0, "density": 1.0}],
    )
    assert_close(result, torch.tensor([2.0, 1.0, 0.0]))


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_magnitude_prune_mostly_zero_delta(density):
    # 70% of entries unchanged by the fine-tune: at density 0.5 the cut falls among the zeros.
    generator = torch.Generator().manual_seed(5)
    delta = torch.randn(400_000, generator=generator)
    delta[torch.rand(delta.shape, generator=generator) < 0.7] = 0.0
    count = delta.numel()
    kept, top = int(density * count), int(0.01 * count)

    expected_magnitude = delta * reference_window(delta.abs(), count - kept, count)
    assert torch.equal(magnitude_prune(delta, density), expected_magnitude)

    expected_outliers = delta * reference_window(delta.abs(), count - kept - top, count - top)
    assert torch.equal(outlier_prune(delta, density, 0.01), expected_outliers)


def test_ties_unchanged_large_tensor_gives_base():
    base = torch.randn(300, 400, generator=torch.Generator().manual_seed(6))
    result = merge("ties", [base.clone(), base.clone()], base=base, per_model=[{"weight": 1.0, "density": 0.5}] * 2)
    assert torch.equal(result, base)

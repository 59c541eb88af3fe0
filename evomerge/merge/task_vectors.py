"""Task-vector merges: task arithmetic, TIES, DARE, breadcrumbs and DELLA.

All eight methods are one computation with two switches, as in mergekit's
``generalized_task_arithmetic.py`` (github.com/arcee-ai/mergekit):

1. task vectors ``d_i = x_i - base``;
2. sparsify each ``d_i`` with the method's sparsifier and the model's ``density``;
3. with sign consensus (the TIES methods) keep per entry only the weighted
   deltas whose sign matches the sign of ``sum_i w_i d_i``;
4. ``merged = sum_i w_i d_i`` over the kept entries, divided by the sum of the
   kept weights when ``normalize`` is true;
5. ``output = base + lambda * merged``.

Density rules: ``density >= 1`` keeps every entry and ``density <= 0`` drops
the whole task vector, which gives the base. When ``density * numel`` rounds
down to 0 for a positive density, the magnitude sparsifiers keep the single
largest entry. mergekit's ``magnitude()`` fails an assertion in that case and
its ``build_mask()`` keeps nothing. Keeping one entry means a tiny tensor such
as a 1-element bias still receives some of the task vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from evomerge.exceptions import MergeError
from evomerge.merge.linear import weight_sum_divisor

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "rank_magnitude"]


def _kept_count(density: float, numel: int) -> int:
    """Return how many entries a density keeps, at least 1 when density is positive."""
    return max(1, int(density * numel))


def _rescale_l1(original_l1: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Scale ``pruned`` in place so that its L1 norm equals ``original_l1``."""
    after = pruned.abs().sum()
    if original_l1.item() < 1e-12 or after.item() < 1e-12:
        return pruned
    return pruned.mul_(original_l1 / after)


def _bernoulli_mask(keep_probability: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw a 0/1 mask on the CPU, so a CPU generator gives the same mask for tensors on any device."""
    mask = torch.bernoulli(keep_probability.cpu(), generator=generator)
    return mask.to(keep_probability.device)


# Below this many entries a rank is selected over the whole tensor at once.
EXACT_SELECTION_SIZE = 65536
# Half-width of the sampled bracket around a rank, in standard deviations of the sample quantile.
BRACKET_DEVIATIONS = 5.0
# Entries per block of the blockwise passes on the CPU. Larger tensors, such
# as embeddings, are split so that no pass allocates a whole-tensor temporary.
# On a 2-core machine, blocks of 2**18 entries measured slower than 2**20,
# because every block costs a few dozen torch calls from Python.
CPU_BLOCK_SIZE = 1 << 20


class _Magnitudes:
    """``|x - base|`` for one model, read block by block without materialising the whole tensor.

    With ``base`` None the magnitudes are ``|x|``. When the tensor fits in one
    block, the task vector computed for its magnitudes is kept, and the next
    ``delta`` call over the whole tensor hands it over instead of computing it
    again.
    """

    def __init__(self, tensor: torch.Tensor, base: torch.Tensor | None, block_size: int) -> None:
        self.tensor = tensor.reshape(-1)
        self.base = base.reshape(-1) if base is not None else None
        self.numel = self.tensor.numel()
        self.block_size = block_size
        self._saved_delta: torch.Tensor | None = None

    def delta(self, start: int, stop: int) -> torch.Tensor:
        """Return ``x - base`` over positions ``[start, stop)`` as a tensor the caller owns."""
        if self._saved_delta is not None and start == 0 and stop == self.numel:
            saved, self._saved_delta = self._saved_delta, None
            return saved
        if self.base is None:
            return self.tensor[start:stop].clone()
        return self.tensor[start:stop] - self.base[start:stop]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Return the magnitudes at the given flat positions."""
        values = self.tensor[positions]
        if self.base is not None:
            values = values - self.base[positions]
        return values.abs_()

    def blocks(self):
        """Yield the magnitudes block by block, in position order."""
        if self.numel <= self.block_size:
            yield self.whole()
            return
        for start in range(0, self.numel, self.block_size):
            yield self.delta(start, min(start + self.block_size, self.numel)).abs_()

    def whole(self) -> torch.Tensor:
        """Return every magnitude as one flat tensor."""
        delta = self.delta(0, self.numel)
        if self.numel <= self.block_size:
            self._saved_delta = delta
        return delta.abs()


@dataclass(frozen=True, eq=False)
class _RankCut:
    """The value at one rank of the ascending magnitudes, with how many are smaller and how many equal it."""

    rank: int
    value: torch.Tensor
    smaller: int
    equal: int


def _exact_cut(values: torch.Tensor, rank: int) -> _RankCut:
    """Select the value at 0-based ``rank`` of the flat tensor ``values`` with one full selection."""
    value = torch.kthvalue(values, rank + 1).values
    return _RankCut(rank, value, int(torch.count_nonzero(values < value)), int(torch.count_nonzero(values == value)))


def _find_cuts(magnitudes: _Magnitudes, ranks: list[int]) -> list[_RankCut]:
    """Return the exact value at each 0-based rank of the ascending magnitudes.

    A full ``kthvalue`` or ``topk`` over a large tensor takes many times longer
    than an elementwise pass. Here a fixed-seed random sample of the magnitudes
    gives, for each rank, two values that bracket it with overwhelming
    probability (BRACKET_DEVIATIONS standard deviations of the sample quantile on each side).
    One blockwise pass counts the entries below each bracket and copies out the
    few inside it, where ``kthvalue`` finds the value. When a bracket misses,
    that rank is selected over the whole tensor.
    """
    count = magnitudes.numel
    if count <= EXACT_SELECTION_SIZE:
        values = magnitudes.whole()
        return [_exact_cut(values, rank) for rank in ranks]

    # Sorting the sample measured about 4x the cost per entry of selecting in a
    # bracket, and a bracket narrows as 1/sqrt(size): this size balances the two.
    size = min(65536, int((0.65 * count) ** (2.0 / 3.0)))
    generator = torch.Generator(device=magnitudes.tensor.device).manual_seed(count)
    picks = torch.randint(count, (size,), generator=generator, device=magnitudes.tensor.device)
    sample = torch.sort(magnitudes.at(picks)).values

    brackets = []
    for rank in ranks:
        fraction = (rank + 0.5) / count
        spread = BRACKET_DEVIATIONS * math.sqrt(fraction * (1.0 - fraction) / size) + 2.0 / size
        low_index = math.floor((fraction - spread) * size)
        high_index = math.ceil((fraction + spread) * size)
        low = sample[low_index] if low_index > 0 else None
        high = sample[high_index] if high_index < size else None
        brackets.append((low, high))

    # Where the sample puts a rank among zero magnitudes (unchanged entries of a
    # fine-tune), counting the zeros finds the cut without copying them out.
    among_zeros = [high is not None and bool(high == 0) for _, high in brackets]
    zeros = 0
    below = [0] * len(ranks)
    bands: list[list[torch.Tensor]] = [[] for _ in ranks]
    for block in magnitudes.blocks():
        if any(among_zeros):
            zeros += block.numel() - int(torch.count_nonzero(block))
        for index, (low, high) in enumerate(brackets):
            if among_zeros[index]:
                continue
            inside = block <= high if high is not None else None
            if low is not None:
                at_least_low = block >= low
                below[index] += block.numel() - int(torch.count_nonzero(at_least_low))
                inside = at_least_low if inside is None else inside.logical_and_(at_least_low)
            bands[index].append(block[inside] if inside is not None else block)

    cuts: list[_RankCut | None] = []
    for index, (rank, smaller, parts) in enumerate(zip(ranks, below, bands)):
        if among_zeros[index]:
            zero = torch.zeros((), dtype=sample.dtype, device=sample.device)
            cuts.append(_RankCut(rank, zero, 0, zeros) if rank < zeros else None)
            continue
        band = torch.cat(parts)
        if smaller <= rank < smaller + band.numel():
            value = torch.kthvalue(band, rank - smaller + 1).values
            cuts.append(
                _RankCut(
                    rank,
                    value,
                    smaller + int(torch.count_nonzero(band < value)),
                    int(torch.count_nonzero(band == value)),
                )
            )
        else:
            cuts.append(None)
    if any(cut is None for cut in cuts):
        values = magnitudes.whole()
        cuts = [cut if cut is not None else _exact_cut(values, rank) for cut, rank in zip(cuts, ranks)]
    return cuts


class _RankWindow:
    """Keeps the entries whose magnitude rank lies in ``[start, stop)``, block by block.

    Ranks count from 0 in ascending order of magnitude, and equal magnitudes
    are ranked by position, as a stable sort orders them. ``mask`` must see the
    blocks in position order, because entries equal to a cut value are kept or
    dropped by how many came before them.
    """

    def __init__(self, magnitudes: _Magnitudes, start: int, stop: int) -> None:
        count = magnitudes.numel
        self.start, self.stop = max(start, 0), min(stop, count)
        self.keeps_all = self.start == 0 and self.stop == count
        self.keeps_none = self.start >= self.stop
        self.lower: _RankCut | None = None
        self.upper: _RankCut | None = None
        if self.keeps_all or self.keeps_none:
            return

        ranks = []
        if self.start > 0:
            ranks.append(self.start)
        if self.stop < count:
            ranks.append(self.stop - 1)
        cuts = _find_cuts(magnitudes, ranks)
        if self.start > 0:
            self.lower = cuts.pop(0)
        if self.stop < count:
            self.upper = cuts.pop(0)
        # Keeping or dropping an entry of magnitude 0 leaves it 0, so a cut at 0
        # needs no position rule, and a lower cut at 0 keeps everything.
        if self.lower is not None and bool(self.lower.value == 0):
            self.lower = None
            self.keeps_all = self.upper is None
        # A cut splits its equal entries when only some of them lie inside the window.
        self.split = [
            cut
            for cut in (self.lower, self.upper)
            if cut is not None
            and bool(cut.value != 0)
            and (cut.smaller < self.start or cut.smaller + cut.equal > self.stop)
        ]
        if len(self.split) == 2 and bool(self.split[0].value == self.split[1].value):
            self.split.pop()
        self.seen = [0] * len(self.split)

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero the entries of the next block of ``delta`` outside the window, in place where possible."""
        if self.keeps_all:
            return delta
        if self.keeps_none:
            return delta.zero_()
        if self.upper is None and not self.split and delta.dtype in (torch.float32, torch.float64):
            # Keeping |d| >= value is keeping |d| > the next smaller float, which hardshrink does in one pass.
            value = self.lower.value
            below = torch.nextafter(value, torch.full_like(value, -math.inf))
            return torch.nn.functional.hardshrink(delta, float(below))
        return delta.mul_(self.mask(delta.abs()))

    def mask(self, magnitudes: torch.Tensor) -> torch.Tensor | None:
        """Return the keep mask of the next block of magnitudes, or None when every entry is kept."""
        if self.keeps_all:
            return None
        if self.keeps_none:
            return torch.zeros_like(magnitudes, dtype=torch.bool)

        split_values = [cut.value for cut in self.split]
        keep: torch.Tensor | None = None
        if self.lower is not None:
            keep = magnitudes > self.lower.value if self.lower in self.split else magnitudes >= self.lower.value
        if self.upper is not None:
            upper = magnitudes < self.upper.value if self.upper in self.split else magnitudes <= self.upper.value
            keep = upper if keep is None else keep.logical_and_(upper)
        for index, (cut, value) in enumerate(zip(self.split, split_values)):
            positions = torch.nonzero(magnitudes == value).reshape(-1)
            ranks = cut.smaller + self.seen[index] + torch.arange(positions.numel(), device=magnitudes.device)
            keep[positions] = (ranks >= self.start) & (ranks < self.stop)
            self.seen[index] += positions.numel()
        return keep


def _block_size(tensor: torch.Tensor) -> int:
    """Return the block size of the blockwise passes: CPU_BLOCK_SIZE on the CPU, the whole tensor elsewhere."""
    return CPU_BLOCK_SIZE if tensor.device.type == "cpu" else max(tensor.numel(), 1)


def _magnitude_window(magnitudes: _Magnitudes, density: float) -> _RankWindow:
    """Return the window that keeps the ``density`` fraction of largest magnitudes."""
    count = magnitudes.numel
    if density >= 1.0:
        return _RankWindow(magnitudes, 0, count)
    if density <= 0.0:
        return _RankWindow(magnitudes, 0, 0)
    return _RankWindow(magnitudes, count - _kept_count(density, count), count)


def _outlier_window(magnitudes: _Magnitudes, density: float, gamma: float) -> _RankWindow:
    """Return the breadcrumbs window: drop the ``gamma`` fraction of largest magnitudes, then the smallest."""
    count = magnitudes.numel
    if density >= 1.0:
        return _RankWindow(magnitudes, 0, count)
    if density <= 0.0:
        return _RankWindow(magnitudes, 0, 0)
    kept = _kept_count(density, count)
    top = min(int(gamma * count), count - kept)
    return _RankWindow(magnitudes, count - kept - top, count - top)


def _apply_window(delta: torch.Tensor, window: _RankWindow, rescale: bool) -> torch.Tensor:
    """Zero in place the entries of ``delta`` outside ``window``; with ``rescale`` keep its L1 norm."""
    if window.keeps_all:
        return delta
    magnitude = delta.abs()
    keep = window.mask(magnitude.reshape(-1)).reshape(delta.shape)
    original_l1 = magnitude.sum() if rescale else None
    del magnitude
    delta.mul_(keep)
    return _rescale_l1(original_l1, delta) if rescale else delta


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude and zero the rest.

    With ``rescale`` the kept entries are scaled to keep the L1 norm of
    ``delta``. Of entries of equal magnitude at the cut-off, the later ones in
    the flattened tensor are kept.
    """
    window = _magnitude_window(_Magnitudes(delta, None, _block_size(delta)), density)
    return _apply_window(delta.clone(), window, rescale)


def outlier_prune(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Drop the largest ``gamma`` fraction by magnitude, then the smallest, so ``density`` remains.

    This is the breadcrumbs mask. ``kept = int(density * n)`` and ``top = int(gamma * n)``.
    When ``kept + top > n``, fewer large entries are dropped so that ``kept`` entries remain.
    Entries of equal magnitude are ordered by position in the flattened tensor.
    """
    window = _outlier_window(_Magnitudes(delta, None, _block_size(delta)), density, gamma)
    return _apply_window(delta.clone(), window, rescale)


def random_drop(
    delta: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE); with ``rescale`` divide the kept entries by ``density``."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)

    mask = _bernoulli_mask(torch.full_like(delta, density), generator)
    pruned = delta * mask
    return pruned / density if rescale else pruned


def rank_magnitude_drop(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop entries with probabilities ranked by magnitude (DELLA's MagPrune).

    Entries are ranked within each row of the tensor reshaped to
    ``(shape[0], -1)``, and a 1-D tensor is one row. The entry of rank r among
    n, smallest magnitude first, is kept with probability ``p_keep = density - epsilon + 2 * epsilon * r / (n - 1)``.
    With ``rescale`` the kept entries are divided by ``p_keep``, which is
    ``1 / (1 - p_drop)``. A 1-entry row is kept with probability ``density``.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    if density - epsilon <= 0.0 or density + epsilon >= 1.0:
        limit = min(density, 1.0 - density)
        raise MergeError(
            f"epsilon {epsilon} with density {density} gives keep probabilities outside (0, 1): "
            f"choose epsilon below {limit:.6g} or move density away from 0 and 1"
        )

    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    # The rank of each entry is its position in the stable sort of its row.
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    positions = torch.arange(width, dtype=torch.float32, device=rows.device).expand(rows.shape[0], width)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=rows.device).scatter_(1, order, positions)
    if width > 1:
        rank_fraction = ranks / (width - 1)
    else:
        rank_fraction = torch.full_like(ranks, 0.5)

    keep_probability = (density - epsilon) + 2.0 * epsilon * rank_fraction
    mask = _bernoulli_mask(keep_probability, generator)
    pruned = rows * mask
    if rescale:
        pruned = pruned / keep_probability
    return pruned.reshape(delta.shape)


def _check_fraction(name: str, value: float, model_index: int) -> None:
    """Raise MergeError unless ``value`` lies in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise MergeError(f"{name} {value} of model {model_index} is outside [0, 1]: give a fraction between 0 and 1")


def _density(parameters: dict[str, float], model_index: int) -> float:
    density = float(parameters.get("density", 1.0))
    _check_fraction("density", density, model_index)
    return density


def _window(
    sparsifier: Sparsifier, magnitudes: _Magnitudes, parameters: dict[str, float], model_index: int
) -> _RankWindow:
    """Return the keep window of a magnitude sparsifier for one model's task vector."""
    density = _density(parameters, model_index)
    if sparsifier == "magnitude":
        return _magnitude_window(magnitudes, density)
    gamma = float(parameters.get("gamma", 0.01))
    _check_fraction("gamma", gamma, model_index)
    return _outlier_window(magnitudes, density, gamma)


def sparsify(
    delta: torch.Tensor,
    sparsifier: Sparsifier | None,
    parameters: dict[str, float],
    rescale: bool,
    generator: torch.Generator | None,
    model_index: int,
) -> torch.Tensor:
    """Apply ``sparsifier`` to one task vector with that model's parameters.

    The magnitude sparsifiers work in place, so ``delta`` must be a tensor the caller owns.
    """
    if sparsifier is None:
        return delta
    if sparsifier in ("magnitude", "magnitude_outliers"):
        window = _window(sparsifier, _Magnitudes(delta, None, _block_size(delta)), parameters, model_index)
        return _apply_window(delta, window, rescale)

    density = _density(parameters, model_index)
    if sparsifier == "random":
        return random_drop(delta, density, rescale, generator)
    if sparsifier == "rank_magnitude":
        return rank_magnitude_drop(delta, density, float(parameters.get("epsilon", 0.15)), rescale, generator)
    raise ValueError(f"unknown sparsifier {sparsifier!r}")


def elected_sign(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Return the sign of ``sum_i w_i d_i`` per entry as 1.0 or -1.0, with 0 counted as positive."""
    elected = torch.mul(deltas[0], weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        elected.add_(delta, alpha=weight)
    # sign gives -1, 0 or 1 (0 also for -0.0); adding 0.5 moves 0 to the positive side.
    return elected.sign_().add_(0.5).sign_()


def _disjoint_sum(
    deltas: list[torch.Tensor], weights: list[float], elected: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """Return ``sum_i w_i d_i`` over the entries whose sign agrees with ``elected``, consuming ``deltas``.

    ``w_i d_i`` agrees where it is nonzero and has the elected sign. With
    ``normalize`` the sum is divided by the sum of the agreeing weights, or by 1
    where no model agrees.
    """
    total: torch.Tensor | None = None
    divisor: torch.Tensor | None = None
    for delta, weight in zip(deltas, weights):
        if weight == 0.0:
            continue
        # w_i * d_i * elected is positive exactly where w_i d_i agrees; zero the rest in place.
        agreeing = delta.mul_(elected).mul_(weight).clamp_(min=0.0)
        if total is None:
            total = agreeing.clone() if normalize else agreeing
        else:
            total.add_(agreeing)
        if normalize:
            # sign is 1 where model i agrees and 0 elsewhere.
            if divisor is None:
                divisor = agreeing.sign_().mul_(weight)
            else:
                divisor.add_(agreeing.sign_(), alpha=weight)
    if total is None:
        return torch.zeros_like(elected)
    if divisor is not None:
        if all(weight >= 0.0 for weight in weights):
            # Where some model agrees the divisor is at least the smallest positive weight.
            divisor.clamp_(min=min(weight for weight in weights if weight > 0.0))
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
        total.div_(divisor)
    return total.mul_(elected)


def merge_task_vectors(
    inputs: list[torch.Tensor],
    base: torch.Tensor | None,
    per_model: list[dict[str, float]],
    options: dict[str, float],
    generator: torch.Generator | None,
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
) -> torch.Tensor:
    """Merge task vectors: ``base + lambda * sum_i w_i sparsify(x_i - base)``, see the module docstring.

    Without a sparsifier, and with the magnitude sparsifiers when ``rescale``
    is off, every step after finding the magnitude cut-offs is elementwise, so
    the merge runs block by block and never holds a whole task vector.
    """
    if base is None:
        raise MergeError("task-vector merges need a base tensor: set base_model to the model the fine-tunes share")
    if not inputs:
        return base.clone()

    rescale = bool(options.get("rescale", False))
    weights = [float(parameters["weight"]) for parameters in per_model]
    normalize = bool(options.get("normalize", False))
    weight_sum = weight_sum_divisor(weights) if normalize else 1.0
    scale = float(options.get("lambda", 1.0))

    if sparsifier is None or (sparsifier in ("magnitude", "magnitude_outliers") and not rescale):
        block_size = _block_size(base)
        sources = [_Magnitudes(tensor, base, block_size) for tensor in inputs]
        windows: list[_RankWindow | None] = [
            _window(sparsifier, source, parameters, index) if sparsifier else None
            for index, (source, parameters) in enumerate(zip(sources, per_model))
        ]
        flat_base = base.reshape(-1)
        merged = torch.empty_like(flat_base)
        for start in range(0, flat_base.numel(), block_size):
            stop = min(start + block_size, flat_base.numel())
            deltas = []
            for source, window in zip(sources, windows):
                delta = source.delta(start, stop)
                deltas.append(window.apply(delta) if window is not None else delta)
            block = _combine(deltas, weights, consensus, normalize, weight_sum)
            torch.add(flat_base[start:stop], block, alpha=scale, out=merged[start:stop])
        return merged.reshape(base.shape)

    deltas = [
        sparsify(tensor - base, sparsifier, parameters, rescale, generator, index)
        for index, (tensor, parameters) in enumerate(zip(inputs, per_model))
    ]
    return torch.add(base, _combine(deltas, weights, consensus, normalize, weight_sum), alpha=scale)


def _combine(
    deltas: list[torch.Tensor], weights: list[float], consensus: bool, normalize: bool, weight_sum: float
) -> torch.Tensor:
    """Return the weighted combination of sparsified task vectors, consuming ``deltas``."""
    if consensus:
        return _disjoint_sum(deltas, weights, elected_sign(deltas, weights), normalize)
    merged = torch.mul(deltas[0], weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        merged.add_(delta, alpha=weight)
    return merged.div_(weight_sum) if normalize else merged

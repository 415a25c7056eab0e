"""DELLA's MagPrune: keep each entry with a probability that rises with its magnitude's rank.

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling" (arXiv 2406.11617). Per row (the last axis; a 1-D tensor is one row) of c entries,
ranked by |δ| ascending (ties by lowest index), rank r ∈ {0, …, c−1} gets the keep probability
p_r = (density − epsilon) + 2·epsilon·r/(c − 1), in [density − epsilon, density + epsilon], mean
density; a one-entry row gets p = density. Survivors are rescaled by 1/p_r (`inverse_keep`, the
paper's, so E[out] = δ), or the tensor by its L1 norm ratio (`l1`, mergekit's `rescale: true`), or
not at all (`none`). mergekit's `della` runs TIES's sign election after it (`combine: ties`), and
`della_linear` a weighted sum (`combine: sum`).

Randomness is DARE's counter hash (`weightx.kernels.rng`): entry i is kept when u(key, i) < p_i,
keyed by the delta's alias (or an explicit `seed`), so masks are the same on every device, block
size and process count, and independent across deltas. They do not reproduce mergekit's
(torch.bernoulli on the global generator). mergekit ranks along axis 1 also for 3-D tensors;
weightx along the last axis (the same for the 2-D matrices of a transformer).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import model_validator
from pydantic_core import PydanticCustomError

from weightx.edits.base import EditConfig, TensorContext
from weightx.edits.dare import l1_factor, l1_norm
from weightx.kernels import rng

PAPER = "https://arxiv.org/abs/2406.11617"
ROW_CHUNK = 1 << 20  # elements ranked at once: bounds the int64 argsort temporaries


def keep_probabilities(mags: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """float64 p per entry of a (rows, c) block of magnitudes (see the module doc)."""
    rows, c = mags.shape
    order = torch.argsort(mags, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(c, device=mags.device).expand(rows, c))
    if c == 1:
        return torch.full(mags.shape, density, dtype=torch.float64, device=mags.device)
    return ranks.to(torch.float64).mul_(2 * epsilon / (c - 1)).add_(density - epsilon)


def della_(delta: torch.Tensor, *, density: float, epsilon: float, key: int,
           rescale: Literal["inverse_keep", "l1", "none"] = "inverse_keep") -> torch.Tensor:
    """MagPrune on a whole tensor, in place."""
    if density >= 1.0:
        return delta
    x = delta.contiguous()
    c = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, c)
    before = l1_norm(x) if rescale == "l1" else 0.0
    step = max(1, ROW_CHUNK // max(c, 1))
    for r0 in range(0, rows.shape[0], step):
        part = rows[r0:r0 + step]
        p = keep_probabilities(part.abs(), density, epsilon)
        u = rng.uniform(key, r0 * c, part.numel(), x.device).view(part.shape)
        keep = u.to(torch.float64) < p
        if rescale == "inverse_keep":
            part.div_(p.to(torch.float32))
        part.mul_(keep)
    if rescale == "l1":
        scale = l1_factor(before, l1_norm(x))
        if scale is not None:
            x.mul_(scale)
    return x


class Della(EditConfig):
    op: Literal["della"] = "della"
    paper: ClassVar[str | None] = PAPER
    density: float
    epsilon: float = 0.15
    rescale: Literal["inverse_keep", "l1", "none"] = "inverse_keep"
    seed: int | None = None  # None: keyed by the delta's alias (independent masks), as `dare`

    def kept_fraction(self) -> float | None:
        return self.density

    elementwise = False  # ranks within rows

    @model_validator(mode="after")
    def _range(self) -> "Della":
        d, e = self.density, self.epsilon
        if not (0.0 < d <= 1.0 and e >= 0.0 and (d == 1.0 or (0.0 < d - e and d + e < 1.0))):
            raise PydanticCustomError(
                "della_range",
                "della needs 0 < density - epsilon and density + epsilon < 1 (keep probabilities lie in "
                "[density - epsilon, density + epsilon]), got density {d} and epsilon {e}; lower epsilon",
                {"d": d, "e": e})
        return self

    def apply(self, delta: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        return della_(delta, density=self.density, epsilon=self.epsilon, key=ctx.seed_key(self.seed), rescale=self.rescale)

    def describe(self) -> str:
        seed = f" seed={self.seed}" if self.seed is not None else ""
        return f"DELLA density={self.density:g} epsilon={self.epsilon:g} rescale={self.rescale}{seed}"

"""FunHashNN (Shi, Feng, Zhu, 2016): U hashes per weight and a small reconstruction net g.

Every virtual weight reads U values of a compression space w through U
independent index hashes h_u, each with its own sign hash xi_u, and a tiny
network g, trained jointly with w, maps them to the weight:

    V[i] = g(xi_1(i) w[h_1(i)], ..., xi_U(i) w[h_U(i)])

g sees the U signed values in hash order, so it can weight them differently.
HashedNets is the case U = 1, g = identity: ``reconstruction="sum"`` with
``num_hashes=1`` reproduces ``hashednets`` bit for bit (hash u = 0 uses the
very keys HashedNets uses, "index" and "sign"; hash u >= 1 uses "index{u}" and
"sign{u}").

Options (:class:`FunHashConfig`):

- ``reconstruction``: what g computes, with z the U signed hashed values.
  ``"mlp"`` (default, the authors' best "G3" without biases): g(z) = w2 . tanh(W1 z)
  with H = U/2 tanh hidden units, U*H + H stored values. ``"linear"``:
  g(z) = a . z, U stored values, initialised to a_u = 1/sqrt(U) so the virtual
  weights keep the variance of w. ``"sum"``: g(z) = (z_1 + ... + z_U)/sqrt(U),
  fixed, nothing stored: multiple hashing without a learned g (the ablation
  that separates the two ideas).
- ``shared_space``: one space w for all layers of a ``compress()`` call
  instead of one per layer; each layer hashes into all of it and keeps its own
  g. The planner's per-layer allocations still fix the total: the space holds
  the sum of the layers' shares minus their g parameters, so the budget flows
  to whichever layer needs it. The space is one Parameter owned by the first
  layer's parametrization (``<layer>.parametrizations.weight.0.space``: once in
  ``state_dict``, ``parameters()`` and ``stored_values``); the other layers
  hold an unregistered reference to that owner and keep an empty ``original``.
  Constraint: after ``compress()`` a shared layer's weight cannot be assigned
  (its projection would move values every layer reads); and each layer scales
  the whole space into its tables, 2 K_total U D multiplies per layer and
  forward (fine for MLP-sized models and small budgets, costly with hundreds
  of layers).
- ``frequency_domain``: hash each conv kernel's orthonormal DCT coefficients
  and rebuild W = IDCT over the kernel dims (FreshNets' frequency view, no
  per-frequency allocation); a no-op for Linear and 1x1 layers.
- ``cache_indices``: keep the U folded hash indices as a non-persistent int32
  buffer (4 U bytes per virtual weight) instead of rehashing every forward.

Evaluation never builds U dense copies of the weight. The first linear map of
g is folded into the gather: for each hash u and hidden unit d the small table
T_ud = M[u, d] * cat(w, -w) (2K values) is gathered with the folded index
h_u + K [xi_u < 0] and accumulated, so pre_d[i] = sum_u M[u, d] xi_u w[h_u(i)]
(M = a for linear/sum, W1^T for mlp) costs U*D one-dimensional gathers whose
backward is an index_add and needs no saved index (it is hashed again; 1-D
gathers because a 2-D row gather or embedding_bag differentiates far slower
on CPU, docs/results/mnist_mlp_funhash.md); large layers split each over the
CPU threads (:func:`.gather.gather_rows`).
Peak memory of a forward, in values of the weight dtype, for N virtual
weights and D = 1 (linear, sum) or D = H = U/2 (mlp): at most N (2D + 2)
(the D columns, one gather, the D tanh outputs and the result), of which
only the N H tanh outputs (mlp) are kept for backward, plus one 2K table at
a time and the index cache of N U int32. Never U dense copies.

``right_inverse`` is least squares on w with g held fixed: minimise
||W - A w||^2, A[i, h_u(i)] += J_u xi_u(i), J = grad g(0), by
Jacobi-preconditioned conjugate gradients on the normal equations (exact for
linear and sum; with one hash A^T A is diagonal and the Jacobi start is
already the exact solution, HashedNets' signed bucket means). For the mlp
this linear fit is the start: g is then rescaled (W1 / rho, w2 * rho: same
slope at 0, unit-RMS pre-activations so tanh is actually nonlinear) and one
backtracked Gauss-Newton step refits w through the tanh. Bit-for-bit: every
hash, the g init (a generator keyed by seed and layer name) and the fit are
pure functions of (seed, layer name, dense weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..dct import dct, idct
from ..hashing import layer_key
from .base import CompressedWeight, LayerSpec, MethodConfig
from .gather import gather_rows
from .hashednets import fold_signed
from .index import CachedIndex, HashedIndex, IndexSource
from .registry import register_method

__all__ = ["FunHashConfig", "FunHashWeight"]

_RECONSTRUCTIONS = ("mlp", "linear", "sum")
_CG_ITERATIONS = 50
_CG_TOLERANCE = 1e-8
_GAUSS_NEWTON_STEPS = 1  # more steps cut the error further only by driving tanh into saturation (values ~1e10)


def _hash_roles(u: int) -> tuple[str, str]:
    """Key roles of hash u; u = 0 shares HashedNets' roles so U = 1 is HashedNets."""
    return ("index", "sign") if u == 0 else (f"index{u}", f"sign{u}")


@dataclass
class FunHashConfig(MethodConfig):
    """Options of ``funhash``; see the module docstring for what each computes."""

    method = "funhash"
    num_hashes: int = 4
    reconstruction: str = "mlp"
    shared_space: bool = False
    frequency_domain: bool = False
    cache_indices: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_hashes, bool) or not isinstance(self.num_hashes, int) or self.num_hashes < 1:
            raise ValueError(f"funhash num_hashes must be an int >= 1, got {self.num_hashes!r}")
        if self.reconstruction not in _RECONSTRUCTIONS:
            raise ValueError(
                f"funhash reconstruction must be one of {list(_RECONSTRUCTIONS)}, got {self.reconstruction!r}"
            )

    @property
    def hidden_units(self) -> int:
        """H of the mlp reconstruction: U/2 tanh units (at least one)."""
        return _hidden_units(self.num_hashes)

    @property
    def g_values(self) -> int:
        """Stored numbers of one layer's g (all count in the budget)."""
        u, h = self.num_hashes, self.hidden_units
        return {"mlp": u * h + h, "linear": u, "sum": 0}[self.reconstruction]


# -- the reconstruction net g ---------------------------------------------------


def _hidden_units(hashes: int) -> int:
    return max(1, hashes // 2)


class _Reconstruction(nn.Module):
    """g split as ``tail(z @ first)``: ``first`` (U, D) is folded into the gather."""

    nonlinear = False

    def first(self, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tail(self, pre: list[torch.Tensor]) -> torch.Tensor:
        """Map the D accumulated columns (each (N,)) to the weights (N,)."""
        return pre[0]

    def slope(self, like: torch.Tensor) -> torch.Tensor:
        """grad g(0) in float64: every g here is odd (g(0) = 0), so g(z) ~ slope . z near 0."""
        return self.first(like)[:, 0].detach().double()

    def normalize_(self, columns: list[torch.Tensor]) -> None:
        """Rescale g's inner layer for the values it now reads (nonlinear g only)."""

    def row_slopes(self, columns: list[torch.Tensor]) -> list[torch.Tensor]:
        """dg/dz_u at every virtual weight, U tensors (N,) in float64 (nonlinear g only)."""
        raise NotImplementedError

    def scale_output_(self, factor: float) -> bool:
        """Multiply g's output by ``factor`` through its own parameters; False if g has none to scale."""
        return False


class _Sum(_Reconstruction):
    """g(z) = sum(z) / sqrt(U), fixed."""

    def __init__(self, hashes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.hashes = hashes

    def first(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full((self.hashes, 1), self.hashes**-0.5, dtype=like.dtype, device=like.device)


class _Linear(_Reconstruction):
    """g(z) = a . z, learned, a_u = 1/sqrt(U) at init."""

    def __init__(self, hashes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((hashes,), hashes**-0.5))

    def first(self, like: torch.Tensor) -> torch.Tensor:
        return self.weight.unsqueeze(1)

    def scale_output_(self, factor: float) -> bool:
        self.weight.mul_(factor)
        return True


class _Mlp(_Reconstruction):
    """g(z) = w2 . tanh(W1 z) with H = U/2 hidden units (the authors' G3, without biases).

    No biases keeps g odd, g(-z) = -g(z), so the sign hashes still make
    collisions unbiased as in HashedNets, and no single number (an output
    bias) shifts every weight of the layer at once: with one, Adam's
    lr-sized steps on it swamped the small hashed weights and a 5-layer MLP
    stopped learning. Hashed values are weight-sized (~0.01), where tanh is
    linear and g would be a linear g in disguise, so ``normalize_`` scales W1
    up and w2 down by the RMS of the pre-activations: the same slope at 0,
    pre-activations of unit RMS, and tanh in its curved range. Keeping W1 and
    w2 O(1) behind a separate fixed scale instead trains far worse: Adam's
    relatively large steps on the small w2 are what let the layer's output
    scale adapt (both comparisons: docs/results/mnist_mlp_funhash.md).
    """

    nonlinear = True

    def __init__(self, hashes: int, generator: torch.Generator) -> None:
        super().__init__()
        hidden = _hidden_units(hashes)
        bound1, bound2 = math.sqrt(6 / (hashes + hidden)), math.sqrt(6 / (hidden + 1))  # Glorot uniform
        self.hidden = nn.Parameter((torch.rand(hidden, hashes, generator=generator) * 2 - 1) * bound1)
        self.output = nn.Parameter((torch.rand(hidden, generator=generator) * 2 - 1) * bound2)

    def first(self, like: torch.Tensor) -> torch.Tensor:
        return self.hidden.t()

    def tail(self, pre: list[torch.Tensor]) -> torch.Tensor:
        out = self.output[0] * torch.tanh(pre[0])
        for d in range(1, len(pre)):
            out = out + self.output[d] * torch.tanh(pre[d])
        return out

    def slope(self, like: torch.Tensor) -> torch.Tensor:
        return self.hidden.detach().double().t() @ self.output.detach().double()

    def normalize_(self, columns: list[torch.Tensor]) -> None:
        rms = float(torch.stack([column.pow(2).mean() for column in columns]).mean().sqrt())
        if rms > 0:
            self.hidden.div_(rms)
            self.output.mul_(rms)

    def scale_output_(self, factor: float) -> bool:
        self.output.mul_(factor)  # tanh stays in the range normalize_ chose
        return True

    def row_slopes(self, columns: list[torch.Tensor]) -> list[torch.Tensor]:
        hidden, output = self.hidden.detach().double(), self.output.detach().double()
        gains = [output[d] * (1 - torch.tanh(column) ** 2) for d, column in enumerate(columns)]
        return [sum(gain * hidden[d, u] for d, gain in enumerate(gains)) for u in range(hidden.shape[1])]


_G_CLASSES: dict[str, type[_Reconstruction]] = {"mlp": _Mlp, "linear": _Linear, "sum": _Sum}


# -- least squares on the hashed space --------------------------------------------


@dataclass
class _Fit:
    """One layer's part of the least-squares problem: W ~ A w."""

    index: list[torch.Tensor]  # U folded indices (N,) in [0, 2K)
    slope: list[torch.Tensor]  # U float64 slopes dg/dz_u, scalars or one per virtual weight (N,)
    target: torch.Tensor  # (N,) float64, flat W (or its kernel DCT), or a residual of it


def _forward_map(fits: Sequence[_Fit], w: torch.Tensor) -> list[torch.Tensor]:
    """A w per layer: sum_u J_u xi_u w[h_u(i)]."""
    signed = torch.cat([w, -w])
    outs = []
    for fit in fits:
        out = torch.zeros_like(fit.target)
        for slope, index in zip(fit.slope, fit.index):
            out += signed.index_select(0, index) * slope
        outs.append(out)
    return outs


def _adjoint(fits: Sequence[_Fit], residuals: Sequence[torch.Tensor], buckets: int) -> torch.Tensor:
    """A^T r, accumulated in float64 over every layer and hash."""
    result = torch.zeros(buckets, dtype=torch.float64, device=residuals[0].device)
    for fit, residual in zip(fits, residuals):
        for slope, index in zip(fit.slope, fit.index):
            sums = torch.zeros(2 * buckets, dtype=torch.float64, device=residual.device)
            sums.index_add_(0, index, residual * slope)
            result += sums[:buckets] - sums[buckets:]
    return result


def _diagonal(fits: Sequence[_Fit], buckets: int) -> torch.Tensor:
    """diag(A^T A) up to rare same-bucket hits within one row: sum of J_u^2 per bucket."""
    result = torch.zeros(buckets, dtype=torch.float64, device=fits[0].target.device)
    for fit in fits:
        for slope, index in zip(fit.slope, fit.index):
            weights = (slope**2).expand(fit.target.shape).contiguous()
            counts = torch.bincount(index, weights=weights, minlength=2 * buckets)
            result += counts[:buckets] + counts[buckets:]
    return result


def _least_squares(fits: Sequence[_Fit], buckets: int) -> torch.Tensor:
    """argmin_w sum over layers ||target - A w||^2 by Jacobi-preconditioned CG (float64).

    Starts at the Jacobi solution D^-1 A^T b, which is exact when every row
    has one hash (HashedNets), and stops once the normal-equation residual is
    below 1e-8 of A^T b.
    """
    rhs = _adjoint(fits, [fit.target for fit in fits], buckets)
    diagonal = _diagonal(fits, buckets)
    occupied = diagonal > 0

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return torch.where(occupied, r / diagonal.where(occupied, 1.0), torch.zeros_like(r))

    def normal(p: torch.Tensor) -> torch.Tensor:
        return _adjoint(fits, _forward_map(fits, p), buckets)

    w = precondition(rhs)
    residual = rhs - normal(w)
    z = precondition(residual)
    direction, rz = z, float(residual @ z)
    limit = _CG_TOLERANCE * float(torch.linalg.vector_norm(rhs))
    for _ in range(_CG_ITERATIONS):
        if float(torch.linalg.vector_norm(residual)) <= limit:
            break
        product = normal(direction)
        curvature = float(direction @ product)
        if curvature <= 0:
            break
        step = rz / curvature
        w = w + step * direction
        residual = residual - step * product
        z = precondition(residual)
        rz, previous = float(residual @ z), rz
        direction = z + (rz / previous) * direction
    return w


@torch.no_grad()
def _fit_space(members: Sequence["FunHashWeight"], weights: Sequence[torch.Tensor], buckets: int) -> torch.Tensor:
    """Values of the space that best rebuild ``weights`` through each member's g (held fixed).

    Linear least squares with g replaced by its slope at 0, which is the
    answer for linear and sum. For the mlp, g is then normalised (unit-RMS
    pre-activations, same slope at 0) and a few Gauss-Newton steps, each
    backtracked until the error drops, fit the values through the curved tanh.
    """
    targets = [member._target(weight) for member, weight in zip(members, weights)]
    values = _least_squares([m._linear_fit(t) for m, t in zip(members, targets)], buckets)
    if not members[0].g.nonlinear:
        return values
    for member in members:
        member.g.normalize_(member._columns(values))

    def fits_at(point: torch.Tensor) -> list[_Fit]:
        return [member._tangent_fit(point, target) for member, target in zip(members, targets)]

    def loss(fits: list[_Fit]) -> float:
        return sum(float(fit.target.pow(2).sum()) for fit in fits)

    fits = fits_at(values)
    for _ in range(_GAUSS_NEWTON_STEPS):
        step = _least_squares(fits, buckets)
        for scale in (1.0, 0.5, 0.25, 0.125):  # backtrack: tanh saturates and full steps can overshoot
            trial = fits_at(values + scale * step)
            if loss(trial) < loss(fits):
                values, fits = values + scale * step, trial
                break
        else:
            break
    return values


# -- the parametrization --------------------------------------------------------


@register_method
class FunHashWeight(CompressedWeight):
    config_class = FunHashConfig
    config: FunHashConfig

    def __init__(self, spec, layer_kind, config, stored_values, seed, device=None) -> None:
        super().__init__(spec, layer_kind, config, stored_values, seed, device)
        self.hashes = config.num_hashes
        self.buckets = self.planned_values - config.g_values
        self._keys = [
            tuple(layer_key(seed, spec.name, role) for role in _hash_roles(u)) for u in range(self.hashes)
        ]
        generator = torch.Generator().manual_seed(layer_key(seed, spec.name, "g"))
        self.g = _G_CLASSES[config.reconstruction](self.hashes, generator).to(device)
        self._kernel_dims = tuple(range(2, len(spec.shape))) if config.frequency_domain else ()
        self._owner: tuple[FunHashWeight, ...] = ()  # shared_space: the layer holding the space
        self._awaiting_registration = config.shared_space
        self.register_buffer("signed_index", None, persistent=False)
        self.space_size = self.buckets
        if not config.shared_space:  # a shared space is sized and hashed into by prepare_group
            self._set_space_size(self.buckets, device)

    @property
    def linear_in_original(self) -> bool:
        """A learned or fixed linear g over this layer's own space (not the mlp, not a shared space)."""
        return self.config.reconstruction != "mlp" and not self.config.shared_space

    @classmethod
    def links_layers(cls, config: FunHashConfig) -> bool:
        return config.shared_space

    # -- planning ---------------------------------------------------------------
    @classmethod
    def min_values(cls, spec: LayerSpec, config: FunHashConfig) -> int:
        return config.g_values + 1

    @classmethod
    def max_values(cls, spec: LayerSpec, config: FunHashConfig) -> int:
        return max(spec.numel, config.g_values + 1)

    # -- hashing ----------------------------------------------------------------
    def _set_space_size(self, buckets: int, device: torch.device | None) -> None:
        """Hash into a space of ``buckets`` values (per layer, or the shared total)."""
        if 2 * buckets >= 2**31:
            raise ValueError(f"layer {self.spec.name!r}: {buckets} funhash values do not fit an int32 index")
        self.space_size = buckets
        self._hashed = [HashedIndex(fold_signed, (*keys, buckets), self.spec.numel) for keys in self._keys]
        if self.config.cache_indices:
            self.signed_index = torch.stack([source.materialize(device) for source in self._hashed])

    def rebuild_caches(self, device: torch.device) -> None:
        """The index cache follows the current space size (a shared space is sized by ``prepare_group``)."""
        self._set_space_size(self.space_size, device)

    def index_sources(self) -> list[IndexSource]:
        return list(self._hashed)

    def _source(self, u: int) -> IndexSource:
        """Where hash u reads: h_u(i) + K [xi_u(i) < 0], cached or hashed on the fly."""
        return self._hashed[u] if self.signed_index is None else CachedIndex(self.signed_index[u])

    # -- shared space -------------------------------------------------------------
    @classmethod
    def prepare_group(cls, members: Sequence[CompressedWeight], weights: Sequence[torch.Tensor]) -> None:
        """shared_space: link every layer to one space sized from their shares; fit it to all weights jointly.

        On a skeleton (meta weights, a checkpoint being loaded) the space is only allocated: its values come
        from the checkpoint.
        """
        shared = [(m, w) for m, w in zip(members, weights) if isinstance(m, FunHashWeight) and m.config.shared_space]
        if not shared:
            return
        owner, first_weight = shared[0]
        total = sum(member.buckets for member, _ in shared)
        for member, weight in shared:
            member._owner = (owner,)
            member._set_space_size(total, weight.device)
            member.g.to(dtype=weight.dtype)
            member._awaiting_registration = not weight.is_meta
        if first_weight.is_meta:
            owner.space = nn.Parameter(torch.empty(total, dtype=first_weight.dtype, device="meta"))
            return
        layers, dense = zip(*shared)
        owner.space = nn.Parameter(_fit_space(layers, dense, total).to(first_weight.dtype))

    def _values(self, original: torch.Tensor) -> torch.Tensor:
        if not self.config.shared_space:
            return original
        if not self._owner:
            raise RuntimeError(
                f"layer {self.spec.name!r} uses funhash shared_space but was not linked to the shared space; "
                "build shared_space layers through compress(), which links all layers of one call"
            )
        return self._owner[0].space

    # -- parametrize protocol ---------------------------------------------------------
    def reconstruct(self, original: torch.Tensor) -> torch.Tensor:
        dense = self.g.tail(self._columns(self._values(original))).view(self.spec.shape)
        return idct(dense, self._kernel_dims) if self._kernel_dims else dense

    def _columns(self, values: torch.Tensor) -> list[torch.Tensor]:
        """pre_d[i] = sum_u M[u, d] xi_u(i) values[h_u(i)] for each of g's D first-layer outputs."""
        signed = torch.cat([values, -values])
        first = self.g.first(values)
        columns = []
        for d in range(first.shape[1]):
            column = None
            for u in range(self.hashes):
                gathered = gather_rows(first[u, d] * signed, self._source(u))
                column = gathered if column is None else column + gathered
            columns.append(column)
        return columns

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        if self.config.shared_space:
            return self._empty_original(weight)
        self.g.to(dtype=weight.dtype)
        return _fit_space([self], [weight], self.space_size).to(weight.dtype)

    @torch.no_grad()
    def rescale_(self, original: torch.Tensor, factor: float) -> None:
        """Through g's output when it is learned; through the values when g is fixed and they are this layer's own."""
        if self.g.scale_output_(factor):
            return
        if self.config.shared_space:
            raise ValueError(
                f"layer {self.spec.name!r}: a fixed g ('sum') on a shared space cannot be rescaled per layer; "
                "use reconstruction='linear' or 'mlp', or init='project'"
            )
        original.mul_(factor)

    def _empty_original(self, weight: torch.Tensor) -> torch.Tensor:
        """shared_space: the space was fitted jointly in prepare_group; ``original`` stays empty."""
        if not self._awaiting_registration:
            raise ValueError(
                f"layer {self.spec.name!r} reads a funhash space shared by every compressed layer, so its weight "
                "cannot be assigned on its own; assign dense weights before compress(), or use shared_space=False"
            )
        self._awaiting_registration = False
        return weight.new_empty(0)

    def _target(self, weight: torch.Tensor) -> torch.Tensor:
        """Flat float64 tensor the hashes index: W, or its DCT over the kernel dims."""
        coefficients = dct(weight, self._kernel_dims) if self._kernel_dims else weight
        return coefficients.reshape(-1).double()

    def _indices(self, device: torch.device) -> list[torch.Tensor]:
        """Every hash's full folded index, int32, for the least-squares fits (compress time only)."""
        return [
            self.signed_index[u] if self.signed_index is not None else self._hashed[u].materialize(device)
            for u in range(self.hashes)
        ]

    def _linear_fit(self, target: torch.Tensor) -> _Fit:
        """target ~ A w with g replaced by its slope at 0."""
        slope = self.g.slope(target).to(target.device)
        return _Fit(self._indices(target.device), list(slope), target)

    def _tangent_fit(self, values: torch.Tensor, target: torch.Tensor) -> _Fit:
        """Gauss-Newton step: the residual target - g(z(values)) ~ J(values) delta."""
        columns = self._columns(values.double())
        return _Fit(self._indices(target.device), self.g.row_slopes(columns), target - self.g.tail(columns))

    def extra_repr(self) -> str:
        c = self.config
        space = f"shared space of {self.space_size}" if c.shared_space else f"{self.space_size} values"
        return f"{self.spec.name}: {self.spec.shape} <- {space}, U={self.hashes}, g={c.reconstruction}"

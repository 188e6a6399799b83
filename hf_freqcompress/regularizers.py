"""Training-time penalties that make weights easy to compress, picked by name.

A regularizer is a callable ``penalty(model) -> scalar tensor`` that the
training loop adds to the task loss::

    penalty = get_regularizer("pq_centroid", subvector=4, k=8)
    loss = criterion(model(x), y) + lam * penalty(model)

Factories are registered by name (:func:`register_regularizer`) so a recipe
can pick one with options, like methods and plan strategies.

About the paper: Soulie, Gripon & Robert ("Compression of Deep Neural
Networks on the Fly", 2016) add an extra regularization term to the cost of
the fully-connected layers during training so that the trained weights lose
little under product quantization. We could not confirm the exact form of
their term from the sources available to us, so ``pq_centroid`` implements
the principled quantization-aware penalty that targets the same goal
directly: the squared distance of every PQ sub-vector to its nearest
current centroid, with the centroids re-fitted by k-means every few steps.
It is a stand-in for the paper's formula, not a transcription of it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .hashing import layer_key
from .kmeans import kmeans, nearest_centroids
from .methods import PQLayout
from .surgery import MIN_LAYER_VALUES, Patterns, Target, select_targets

__all__ = [
    "Penalty",
    "register_regularizer",
    "get_regularizer",
    "available_regularizers",
    "PQCentroidPenalty",
]

Penalty = Callable[[nn.Module], torch.Tensor]

_REGULARIZERS: dict[str, Callable[..., Penalty]] = {}


def register_regularizer(name: str) -> Callable[[Callable[..., Penalty]], Callable[..., Penalty]]:
    """Decorator: make the factory (a class or function returning a penalty) available as ``name``."""

    def decorate(factory: Callable[..., Penalty]) -> Callable[..., Penalty]:
        if name in _REGULARIZERS and _REGULARIZERS[name] is not factory:
            raise ValueError(f"regularizer {name!r} is already registered")
        _REGULARIZERS[name] = factory
        return factory

    return decorate


def available_regularizers() -> list[str]:
    return sorted(_REGULARIZERS)


def get_regularizer(name: str, **options) -> Penalty:
    """Build the penalty registered as ``name`` with ``options`` (e.g. from a recipe)."""
    if name not in _REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; available: {available_regularizers()}")
    return _REGULARIZERS[name](**options)


@register_regularizer("pq_centroid")
class PQCentroidPenalty:
    """Pull each weight sub-vector toward its nearest product-quantization centroid.

    With the same geometry as the ``pq`` method (sub-vectors of ``subvector``
    inputs, ``codebooks`` groups of ``k`` centroids per layer), for the
    targeted layers L:

        P(model) = sum_L sum_{sub-vectors x of W_L} min_j ||x - c_{L, group(x), j}||^2

    The centroids c are constants (no gradient): k-means of the current
    weights, re-fitted on the first call and then every ``recluster_every``
    calls (one call per training step). Between re-fits the gradient
    2 (x - c_nearest) is a per-weight pull toward the quantized value, like
    weight decay toward a moving target; ``lam`` plays the role of the
    weight-decay coefficient, independent of layer size because P is a sum.
    When P reaches 0 every sub-vector sits on a centroid and product
    quantization with these settings is lossless.

    ``targets`` / ``exclude`` select layers exactly as in ``compress()``
    (pass ``exclude=[]`` to include the classifier head).
    """

    def __init__(
        self,
        subvector: int = 4,
        k: int = 16,
        codebooks: int | None = 1,
        recluster_every: int = 500,
        iterations: int = 10,
        seed: int = 0,
        targets: Patterns = None,
        exclude: Patterns = None,
        min_layer_values: int = MIN_LAYER_VALUES,
    ) -> None:
        if recluster_every < 1:
            raise ValueError(f"recluster_every must be >= 1 step, got {recluster_every}")
        self.subvector, self.k, self.codebooks = subvector, k, codebooks
        self.recluster_every, self.iterations, self.seed = recluster_every, iterations, seed
        self.targets, self.exclude, self.min_layer_values = targets, exclude, min_layer_values
        self.calls = 0
        self._layers: list[tuple[Target, PQLayout, torch.Tensor]] = []

    def _canonical(self, target: Target) -> torch.Tensor:
        return target.kind.to_canonical(target.weight)

    @torch.no_grad()
    def recluster(self, model: nn.Module) -> None:
        """Select the layers and fit fresh centroids to their current weights."""
        self._layers = []
        for target in select_targets(model, self.targets, self.exclude, self.min_layer_values):
            weight = self._canonical(target)
            layout = PQLayout.of(tuple(weight.shape), self.subvector, self.k, self.codebooks)
            if (problem := layout.problem()) is not None:
                raise ValueError(f"pq_centroid cannot cover layer {target.weight_name!r}: {problem}")
            key = layer_key(self.seed, target.weight_name, "pq_centroid")
            generator = torch.Generator(device=weight.device).manual_seed(key)
            centroids, _ = kmeans(layout.subvectors(weight), self.k, generator=generator, iterations=self.iterations)
            self._layers.append((target, layout, centroids))

    def __call__(self, model: nn.Module) -> torch.Tensor:
        if self.calls % self.recluster_every == 0:
            self.recluster(model)
        self.calls += 1
        total = None
        for target, layout, centroids in self._layers:
            points = layout.subvectors(self._canonical(target))
            with torch.no_grad():
                _, nearest = nearest_centroids(points.detach(), centroids.to(points.dtype))
            pulled = torch.gather(centroids.to(points.dtype), 1, nearest[..., None].expand_as(points))
            term = (points - pulled).pow(2).sum()
            total = term if total is None else total + term
        return total

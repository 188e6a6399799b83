"""What ``compress()`` did, layer by layer, in numbers a user can check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerReport", "CompressionReport"]


@dataclass(frozen=True)
class LayerReport:
    """One compressed weight: sizes before and after and the projection error.

    ``rel_error`` is ||W - W_hat|| / ||W|| right after compression, before
    any fine-tuning: how much of a trained layer survives the projection.
    ``stored_values`` / ``stored_bits`` describe the final stored form;
    ``training_values`` counts numbers that exist only until ``finalize()``
    (e.g. selection logits) and are never saved. With calibration,
    ``output_error`` is the relative error of the layer's output on the
    calibration inputs and ``seed`` the hash seed this layer chose (None:
    the report's seed).
    """

    name: str
    kind: str
    method: str
    shape: tuple[int, ...]
    dense_values: int
    stored_values: int
    stored_bits: int
    cache_bytes: int
    rel_error: float
    training_values: int = 0
    seed: int | None = None
    output_error: float | None = None

    @property
    def ratio(self) -> float:
        return self.dense_values / max(self.stored_values, 1)


@dataclass(frozen=True)
class CompressionReport:
    """Totals over the targeted layers plus one :class:`LayerReport` per layer."""

    method: str
    budget: str
    seed: int
    storage_dtype: str
    layers: list[LayerReport] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    """With calibration: {"batches", "seconds", "strategy", "seed_trials"}."""

    def seed_of(self, layer: LayerReport) -> int:
        """The hash seed ``layer`` was built with."""
        return self.seed if layer.seed is None else layer.seed

    @property
    def dense_values(self) -> int:
        return sum(layer.dense_values for layer in self.layers)

    @property
    def stored_values(self) -> int:
        return sum(layer.stored_values for layer in self.layers)

    @property
    def stored_bytes(self) -> int:
        """Each layer's bits rounded up to whole bytes: layers are saved as separate tensors."""
        return sum((layer.stored_bits + 7) // 8 for layer in self.layers)

    @property
    def training_values(self) -> int:
        return sum(layer.training_values for layer in self.layers)

    @property
    def cache_bytes(self) -> int:
        return sum(layer.cache_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        return self.dense_values / max(self.stored_values, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "seed": self.seed,
            "storage_dtype": self.storage_dtype,
            "dense_values": self.dense_values,
            "stored_values": self.stored_values,
            "stored_bytes": self.stored_bytes,
            "cache_bytes": self.cache_bytes,
            "training_values": self.training_values,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionReport":
        layers = [LayerReport(**{**row, "shape": tuple(row["shape"])}) for row in data["layers"]]
        return cls(data["method"], data["budget"], data["seed"], data["storage_dtype"], layers, data.get("calibration"))

    def table(self) -> str:
        """A fixed-width table, one row per layer, totals last (also used in model cards)."""
        calibrated = self.calibration is not None
        header = ("layer", "kind", "shape", "dense", "stored", "ratio", "rel_err", *(("out_err", "seed") if calibrated else ()))
        rows = [
            (
                layer.name,
                layer.kind,
                "x".join(map(str, layer.shape)),
                f"{layer.dense_values:,}",
                f"{layer.stored_values:,}",
                f"{layer.ratio:.1f}x",
                f"{layer.rel_error:.3f}",
                *((f"{layer.output_error:.3f}" if layer.output_error is not None else "-", str(self.seed_of(layer)))
                  if calibrated else ()),
            )
            for layer in self.layers
        ]
        total = ("total", "", "", f"{self.dense_values:,}", f"{self.stored_values:,}", f"{self.ratio:.1f}x", "")
        rows.append((*total, *(("", "") if calibrated else ())))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        summary = (
            f"{self.method} at budget {self.budget}: {len(self.layers)} layers, "
            f"{self.dense_values:,} -> {self.stored_values:,} values ({self.ratio:.1f}x), "
            f"{self.stored_bytes:,} bytes as {self.storage_dtype}, "
            f"hash caches {self.cache_bytes:,} bytes (not saved)"
        )
        if self.calibration is not None:
            summary += (
                f"; calibrated on {self.calibration['batches']} batches in {self.calibration['seconds']:.1f} s "
                f"(split: {self.calibration['strategy']}, seed trials: {self.calibration['seed_trials']})"
            )
        if self.training_values:
            summary += (
                f"; plus {self.training_values:,} training-only values (not saved, gone after finalize()): "
                "the sizes above are the final stored form"
            )
        return f"{summary}\n{self.table()}"

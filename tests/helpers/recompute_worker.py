"""One rank of the DDP check in tests/test_recompute.py: train a compressed model with weight recompute under DDP.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/recompute_worker.py OUT

Each rank trains on its half of every batch and writes ``OUT/rank<r>.safetensors``
(its state dict) and ``OUT/rank<r>.json`` (world size, rank). The test imports
:func:`build`, :func:`batches` and :func:`step` to train the same model in one
process, on the default path, and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

import hf_freqcompress

WORLD = 2
LR = 0.1


def build() -> nn.Module:
    """A compressed MLP whose layers carry reconstruction nets (funhash): gradients reach more than ``original``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    hf_freqcompress.compress(model, budget="1/4", method={"method": "funhash", "reconstruction": "mlp"}, exclude=[])
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)) for _ in range(3)
    ]


def step(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Loss and backward on one rank's share of a batch (gradients accumulate into ``.grad``)."""
    nn.functional.cross_entropy(model(inputs), labels).backward()


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from hf_freqcompress.recompute import enable_weight_recompute

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = enable_weight_recompute(build())
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for inputs, labels in batches():
        step(ddp, inputs.chunk(WORLD)[rank], labels.chunk(WORLD)[rank])
        optimizer.step()
        optimizer.zero_grad()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": dist.get_world_size(), "rank": rank}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

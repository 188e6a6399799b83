"""Run one recipe in this process (one rank of a launch) and dump what the test compares.

Each rank writes ``<dump>/rank<r>.safetensors`` (its copy of every stored
tensor of the trained model) and ``<dump>/rank<r>.json`` (world size, rank,
steps), so a test can check the world size was real and the ranks agree.

    accelerate launch --multi_cpu --num_processes 2 tests/helpers/train_worker.py RECIPE DUMP [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from hf_freqcompress.training import load_recipe, train


def main() -> None:
    recipe_path, dump, *overrides = sys.argv[1:]
    resume = None
    if overrides and overrides[0].startswith("--resume="):
        resume = overrides.pop(0).split("=", 1)[1]
    result = train(load_recipe(recipe_path, overrides), resume_from=resume)
    rank = result.accelerator.process_index
    out = Path(dump)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    info = {"world_size": result.accelerator.num_processes, "rank": rank, "steps": result.global_step,
            "stopped": result.stopped, **result.metrics}
    (out / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()

"""One data-parallel rank for tests/test_distributed.py, started by torchrun (or called alone:
the one-process reference). For each config, writes into the directory beside it, per rank, the
number of frozen base values the rank holds, the gradient of step 1 as DDP (or FSDP and
distributed.sum_gradients) leaves it, and the adapters after train.max_steps steps.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py DIR/config.json [DIR2/config.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm import distributed  # noqa: E402
from minivlm.build import build, load_processor  # noqa: E402
from minivlm.config import from_dict  # noqa: E402
from minivlm.data import load_split  # noqa: E402
from minivlm.steps import filler_batch, train_loader  # noqa: E402
from minivlm.evaluate import scores  # noqa: E402
from minivlm.loop import train  # noqa: E402
from minivlm.objectives import get_objective  # noqa: E402


def trainable(model: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    return {distributed.unwrapped_name(n): getattr(p, what).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def run(config: Path) -> None:
    cfg, out = from_dict(json.loads(config.read_text())), config.parent
    world, rank, t = distributed.world_size(), distributed.rank(), cfg.train
    objective = get_objective(t.objective)
    ds = load_split(cfg.data, cfg.data.train_split, streaming=cfg.data.streaming)
    processor = load_processor(cfg)

    # Step 1's gradient, with B non-zero (the same on every rank) so that A has one too.
    built = build(cfg, processor)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model = distributed.wrap(built.model, built.device, shard=t.fsdp)
    # What this rank holds of the frozen base: all of it under DDP, its shard of the layers under FSDP.
    held = sum(p.numel() for p in built.model.parameters() if not p.requires_grad)
    Path(f"{out}/held-rank{rank}.json").write_text(json.dumps(held))
    batches = next(iter(train_loader(ds, cfg.data, cfg.model.family, processor, t.batch_size, t.grad_accum, t.seed,
                                     0, 1, world, rank, collate_fn=objective.collate))).batches
    filler = filler_batch(ds, cfg.data, built.family, processor) if world > 1 else None
    objective.backward_window(cfg, built, model, batches, torch.amp.GradScaler("cpu", enabled=False),
                              objective.setup(cfg, built), filler)
    distributed.sum_gradients(model, [p for p in built.model.parameters() if p.requires_grad])
    save_file(trainable(built.model, "grad"), f"{out}/grads-rank{rank}.safetensors")

    built = build(cfg, processor)  # a fresh model, as train.py would train
    # With eval_every, the scores before training too (as train.py measures them), which under FSDP
    # run before the wrapper's first forward.
    eval_ds = load_split(cfg.data, cfg.data.eval_split) if t.eval_every else None
    state = objective.setup(cfg, built)
    before = scores(cfg, built, eval_ds, objective, state) if eval_ds is not None else None
    train(cfg, built, objective, ds, eval_ds=eval_ds, before=before, state=state)
    save_file(trainable(built.model, "data"), f"{out}/adapters-rank{rank}.safetensors")


if __name__ == "__main__":
    distributed.init("cpu")
    for config in sys.argv[1:]:  # one launch for all: starting processes is most of the time here
        run(Path(config))
    distributed.close()

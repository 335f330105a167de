"""Train as ``python -m trainer.fit`` does and save this rank's final weights, so a test can
compare the replicas of a ``torchrun`` run:

    torchrun --nproc_per_node=2 -m tests.trainer.rank_weights OUT_DIR key.path=value ...

writes ``OUT_DIR/rank<N>.pt`` (the evaluated model's state_dict) from every rank.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from shared.inference import resolve_device
from trainer import distributed
from trainer.build import build_run
from trainer.config import load_config
from trainer.fit import train_epochs


def main(argv: Sequence[str]) -> None:
    out, overrides = Path(argv[0]), argv[1:]
    cfg = load_config(None, overrides)
    info = distributed.setup(resolve_device(cfg.train.device))
    try:
        run = build_run(cfg, info)
        train_epochs(run)
        distributed.average_buffers(run.eval_model)
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu() for k, v in run.eval_model.state_dict().items()}
        torch.save(weights, out / f"rank{info.rank}.pt")
        distributed.barrier()
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])

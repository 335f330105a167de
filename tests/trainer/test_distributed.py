from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from shared.checkpoint import load_checkpoint
from tests.trainer.conftest import tiny_overrides
from trainer import distributed

REPO = Path(__file__).resolve().parents[2]


def test_helpers_without_a_process_group_are_identities() -> None:
    cpu = torch.device("cpu")
    matrix = np.array([[3, 1], [0, 2]], dtype=np.int64)
    assert distributed.all_reduce_sum(matrix, cpu) is matrix
    assert distributed.any_rank(True, cpu) is True
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(7) == [7]
    info = distributed.setup(cpu)
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)


def test_collectives_in_a_one_process_group(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        matrix = np.array([[2**40, 1], [0, 2]], dtype=np.int64)
        reduced = distributed.all_reduce_sum(matrix, cpu)
        assert reduced.dtype == np.int64 and np.array_equal(reduced, matrix)  # exact counts
        assert distributed.any_rank(False, cpu) is False
        assert distributed.broadcast_object([1, "x"]) == [1, "x"]
        assert distributed.all_gather_object({"r": 0}) == [{"r": 0}]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_two_cpu_processes_end_with_identical_weights(
    dataset: Path, tmp_path: Path
) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    states = tmp_path / "states"
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny_overrides(dataset, out, train__max_steps=2, model__aux_loss=True)
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tests.trainer.rank_weights",
            str(states),
            *args,
        ],  # fmt: skip
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(states / "rank0.pt", weights_only=True)
    rank1 = torch.load(states / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    # Only rank 0 writes the run folder; its checkpoint is the replicas' common state.
    ckpt = load_checkpoint(out / "run" / "last.pt")
    assert all(torch.equal(ckpt["state_dict"][k], rank0[k]) for k in rank0)
    assert ckpt["training_state"]["world_size"] == 2
    assert len(ckpt["training_state"]["rng"]) == 2
    assert [p.name for p in out.iterdir()] == ["run"]
    # 3 validation tiles of 64x64, split 2 + 1 between the ranks: the reduced confusion matrix
    # counts every pixel of all of them exactly once.
    support = sum(c["support_pixels"] for c in ckpt["metrics"]["val"]["per_class"])
    assert support == 3 * 64 * 64
    # Log lines come from rank 0 only.
    assert proc.stdout.count("run folder") == 1

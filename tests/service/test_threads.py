"""The forward pass runs on SATSEG_TORCH_THREADS; request and I/O threads on one torch thread."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.service.helpers import encode, running_app, scene, settings_for


def test_only_the_batcher_runs_torch_on_several_threads(varied_checkpoint: Path) -> None:
    before = torch.get_num_threads()
    try:
        with running_app(settings_for(varied_checkpoint, torch_threads=2)) as client:
            engine = client.app.state.engine
            predictor = engine.predictor
            seen: list[int] = []
            run_batch = predictor.run_batch

            def recording(batch: torch.Tensor) -> torch.Tensor:
                seen.append(torch.get_num_threads())
                return run_batch(batch)

            predictor.run_batch = recording
            answer = client.post("/segment", files={"image": ("x.png", encode(scene(40, 40)))})
            assert answer.status_code == 200
            request = engine._request_pool.submit(torch.get_num_threads).result(timeout=30)
            io = engine._io_pool.submit(torch.get_num_threads).result(timeout=30)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}
    assert (request, io) == (1, 1)

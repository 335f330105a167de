"""Smoke tests of ``python -m benchmarks.inference --quick`` on a tiny model: it runs and writes
the JSON fields the results are read from. Nothing here is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import inference

FIELDS = (
    "machine",
    "baseline",
    "engine",
    "engine_over_baseline",
    "pixel_agreement",
    "targets",
    "targets_met",
)


def run(tmp_path: Path, checkpoint: Path, *extra: str) -> dict:
    out = tmp_path / "inference.json"
    args = ["--quick", "--checkpoint", str(checkpoint), "--size", "64", "--json", str(out)]
    # One thread: tiny convolutions on two threads crawl when another process holds a core.
    args += ["--repeat", "1", "--agreement-tiles", "2", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert inference.main([*args, *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_quick_engine_and_candidates(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = run(tmp_path, tiny_checkpoint, "--skip-scaling", "--skip-service", "--skip-peers")
    for field in FIELDS:
        assert field in result, field
    assert result["random_init"] is False  # the checkpoint given was used
    assert result["arch"]["backbone"] == "mobilenet_v3_large"
    assert [r["batch"] for r in result["engine"]["rows"]] == [1, 4]
    assert all(r["images_per_s"] > 0 for r in result["engine"]["rows"])
    assert 0.0 <= result["pixel_agreement"] <= 1.0
    assert set(result["class_iou"]) == {"ocean", "land", "lake"}
    # Agreement pools the test band's tiles with one from each lake region.
    assert result["agreement_tiles"] == ["test band"] * 2 + list(inference.AGREEMENT_REGIONS)
    assert result["engine_over_baseline"] > 0
    variants = [c["variant"] for c in result["candidates"]]
    assert variants[0].startswith("eager fp32") and any("int8" in v for v in variants)
    assert all("pixel_agreement" in c or "error" in c for c in result["candidates"])
    assert all("class_iou" in c or "error" in c for c in result["candidates"])


def test_peers_run_beside_the_engine_or_say_why_not(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import peers

    installed = peers._installed
    monkeypatch.setattr(peers, "_installed", lambda module: module != "nncf" and installed(module))
    result = run(
        tmp_path,
        tiny_checkpoint,
        "--skip-scaling",
        "--skip-service",
        "--skip-candidates",
        "--precision",
        "fp32",
    )
    rows = {r["runtime"]: r for r in result["peers"]}
    assert list(rows) == list(peers.REQUIRED_BY_RUNTIME)
    nncf_row = rows["openvino int8 (nncf)"]["skipped"]
    assert nncf_row.startswith("not installed:") and "nncf" in nncf_row
    for name, row in rows.items():
        if "skipped" in row:  # this machine lacks the runtime: the reason names the package
            assert "not installed" in row["skipped"] or name == "openvino int8 (nncf)"
            continue
        assert row["batch1_s"] > 0 and row["speedup"] > 0
        assert set(row["class_iou"]) == {"ocean", "land", "lake"}
        if name == "onnx runtime fp32":
            # The same fp32 function: the same answers, but for pixels whose logits a random
            # model leaves nearly tied, where another summation order may pick another class.
            assert row["pixel_agreement"] > 0.95


def test_quick_precision_override_reaches_the_engine(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = run(
        tmp_path,
        tiny_checkpoint,
        "--skip-scaling",
        "--skip-service",
        "--skip-candidates",
        "--skip-peers",
        "--precision",
        "fp32",
        "--optimize",
    )
    assert result["engine"]["precision"] == "fp32"
    assert result["engine"]["options"]["optimize"] is True
    assert "batchnorm folded" in result["engine"]["forward"]


def test_quick_full_path_with_service_and_scene(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = run(
        tmp_path,
        tiny_checkpoint,
        "--skip-candidates",
        "--skip-peers",
        "--precision",
        "fp32",
        "--scene",
        "256x128",
        "--requests",
        "2",
    )
    assert [r["size"] for r in result["scaling"]] == ["64x64", "128x128"]
    assert result["scene_memory"]["peak_rss_mib"] > 0
    assert result["scene_memory"]["mask_shape"] == [128, 256]
    service = result["service"]
    assert "error" not in service, service.get("error")
    assert {(r["format"], r["clients"]) for r in service["rows"]} == {
        ("png", 1),
        ("png", 4),
        ("rle", 1),
        ("rle", 4),
    }
    assert all(r["errors"] == 0 and r["p95_ms"] >= r["p50_ms"] for r in service["rows"])
    assert service["precision"] == "fp32"
    assert result["service_over_engine"] > 0 and result["service_over_engine_rle"] > 0


def test_eager_baseline_builds_backbones_torchvision_does_not_ship() -> None:
    from shared.model import build_model

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large_fine", num_classes=3).eval()
    ckpt = {
        "arch": {"backbone": "mobilenet_v3_large_fine", "num_classes": 3},
        "state_dict": model.state_dict(),
    }
    baseline = inference.torchvision_baseline(ckpt)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(baseline(x)["out"], model(x)["out"])

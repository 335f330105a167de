"""``trainer.predict`` with a multi-band model: the 6-band scene with its untagged collar is
streamed to a COG and a PNG with 255 on the collar, the same answer as the model called by hand;
a scene at another scale is answered with a warning line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from tests.geodata import geotiff_bytes, sentinel2_like_scene
from tests.service.test_bands import IGNORE, TILE_GSD_M, expected_mask, six_band_checkpoint
from trainer.predict import EXIT_OK, main


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bands, _ = sentinel2_like_scene()
    path = tmp_path_factory.mktemp("scene") / "s2.tif"
    path.write_bytes(geotiff_bytes(bands))
    return path


def run(checkpoint: Path, scene: Path, out: Path, *extra: str) -> int:
    return main(
        [str(scene), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]
        + ["--precision", "fp32", "--tile", "128", "--overlap", "16", "--workers", "1", *extra]
    )


def test_predict_writes_255_on_the_collar(tmp_path, scene_file, capsys):
    checkpoint = six_band_checkpoint(tmp_path / "six.pt", gsd_m=TILE_GSD_M)
    bands, footprint = sentinel2_like_scene()
    expected = expected_mask(checkpoint, bands, footprint)
    assert run(checkpoint, scene_file, tmp_path / "cog", "--format", "cog") == EXIT_OK
    with rasterio.open(tmp_path / "cog" / "s2.tif") as src:
        assert src.nodata == IGNORE
        np.testing.assert_array_equal(src.read(1), expected)
    assert run(checkpoint, scene_file, tmp_path / "png", "--format", "png") == EXIT_OK
    png = np.asarray(Image.open(tmp_path / "png" / "s2.png"))
    np.testing.assert_array_equal(png, expected)
    assert "warning" not in capsys.readouterr().err


def test_predict_nodata_none_predicts_the_collar(tmp_path, scene_file):
    checkpoint = six_band_checkpoint(tmp_path / "six.pt")
    out = tmp_path / "none"
    assert run(checkpoint, scene_file, out, "--format", "cog", "--nodata", "none") == EXIT_OK
    with rasterio.open(out / "s2.tif") as src:
        assert (src.read(1) != IGNORE).all()


def test_predict_warns_about_another_scale(tmp_path, scene_file, capsys):
    checkpoint = six_band_checkpoint(tmp_path / "fine.pt", gsd_m=30.0)
    assert run(checkpoint, scene_file, tmp_path / "out", "--format", "cog") == EXIT_OK
    err = capsys.readouterr().err
    assert f"warning: {scene_file}" in err and "trained on 30 m pixels" in err


def test_predict_refuses_a_scene_without_the_bands(tmp_path):
    checkpoint = six_band_checkpoint(tmp_path / "six.pt")
    bands, _ = sentinel2_like_scene()
    three = tmp_path / "rgb.tif"
    three.write_bytes(geotiff_bytes(bands[:3].copy()))
    assert run(checkpoint, three, tmp_path / "out") != EXIT_OK


def test_ray_refuses_a_multi_band_model_by_name(tmp_path, scene_file, capsys):
    checkpoint = six_band_checkpoint(tmp_path / "six.pt")
    assert run(checkpoint, scene_file, tmp_path / "out", "--ray", "local") == 2
    assert "--ray runs 8-bit RGB models" in capsys.readouterr().err

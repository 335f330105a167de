"""Training on multi-band rasters: a Sentinel-2-like dataset of 6-band uint16 GeoTIFF chips with
an untagged, rotated zero collar, built in the test from the bundled Blue Marble tile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from shared.checkpoint import bands_from_checkpoint, load_checkpoint
from shared.imaging import encode_png
from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap
from shared.preprocess import STATS_FILE
from shared.raster import open_for_model
from tests.geodata import S2_BAND_NAMES, TILE_TRANSFORM, sentinel2_like_scene
from tests.trainer.conftest import tiny_overrides
from trainer.data import SegmentationDataset, collect_pairs
from trainer.dataset_layout import dataset_band_spec
from trainer.evaluate import main as evaluate_main
from trainer.fit import main as fit_main

# Chips of the scene at these footprint angles: each has its own collar.
TRAIN_ANGLES = (4.0, 9.0, 14.0, -6.0, -11.0, 19.0)
TEST_ANGLES = (7.0, -16.0)
FILE_CLASS_ON_COLLAR = 0  # what the mask files say under the collar (ocean)


def _labels(scene: np.ndarray) -> np.ndarray:
    """Land (1) where red outshines blue, else ocean (0): a rule the model can learn."""
    blue, red = scene[0].astype(np.int32), scene[2].astype(np.int32)
    return (red > blue).astype(np.uint8)


def _write_chip(split: Path, stem: str, angle: float, tiff_mask: bool) -> np.ndarray:
    """One 6-band uint16 GeoTIFF chip (band descriptions as Sentinel-2's) and its mask (GeoTIFF
    or PNG); returns the chip's footprint (True where the scene has data)."""
    scene, footprint = sentinel2_like_scene(angle)
    (split / "IMAGES").mkdir(parents=True, exist_ok=True)
    (split / "MASKS").mkdir(parents=True, exist_ok=True)
    count, height, width = scene.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "crs": "EPSG:4326"}
    profile["transform"] = TILE_TRANSFORM
    with rasterio.open(
        split / "IMAGES" / f"{stem}.tif", "w", count=count, dtype="uint16", **profile
    ) as dst:
        dst.write(scene)
        for i, name in enumerate(S2_BAND_NAMES, start=1):
            dst.set_band_description(i, name)
    mask = np.where(footprint, _labels(scene), FILE_CLASS_ON_COLLAR).astype(np.uint8)
    if tiff_mask:
        with rasterio.open(
            split / "MASKS" / f"{stem}.tif",
            "w",
            count=1,
            dtype="uint8",
            compress="deflate",
            **profile,
        ) as dst:
            dst.write(mask[None])
    else:
        (split / "MASKS" / f"{stem}.png").write_bytes(encode_png(mask))
    return footprint


def make_s2_dataset(root: Path) -> dict[str, list[np.ndarray]]:
    """The workshop layout of 6-band chips; returns each split's footprints in stem order."""
    footprints: dict[str, list[np.ndarray]] = {"trainval": [], "test": []}
    for split, folder, angles in (
        ("trainval", "TAIN_VAL_SET", TRAIN_ANGLES),
        ("test", "TEST_SET", TEST_ANGLES),
    ):
        for i, angle in enumerate(angles):
            footprints[split].append(_write_chip(root / folder, f"chip{i}", angle, i % 2 == 0))
    return footprints


@pytest.fixture(scope="module")
def s2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    root = tmp_path_factory.mktemp("s2") / "data"
    return root, make_s2_dataset(root)


@pytest.fixture(scope="module")
def trained(s2: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a few training steps on the 6-band dataset."""
    root, _ = s2
    out = tmp_path_factory.mktemp("runs")
    rc = fit_main(tiny_overrides(root, out, train__max_steps=3))
    assert rc == 0
    return out / "run"


def test_the_collar_is_ignore_index_in_the_dataset_masks(s2: tuple[Path, dict]) -> None:
    root, footprints = s2
    lm = LabelMap.load()
    spec, _ = dataset_band_spec(root)
    assert spec.names == S2_BAND_NAMES and spec.dtype == "uint16"
    fill = [100.0, 200.0, 300.0, 400.0, 500.0, 600.0]
    dataset = SegmentationDataset(collect_pairs(root, "trainval", lm), lm, spec=spec, fill=fill)
    for i, footprint in enumerate(footprints["trainval"]):
        image, mask = dataset[i]
        scene, _ = sentinel2_like_scene(TRAIN_ANGLES[i])
        assert image.shape == (64, 96, 6) and image.dtype == np.uint16
        assert (~footprint).sum() > 500  # the collar is there to be found
        assert (mask[~footprint] == lm.ignore_index).all()
        np.testing.assert_array_equal(mask[footprint], _labels(scene)[footprint])
        # The collar holds the fill values, the scene its own.
        collar_values = np.tile(np.array(fill, dtype=np.uint16), ((~footprint).sum(), 1))
        np.testing.assert_array_equal(image[~footprint], collar_values)
        np.testing.assert_array_equal(image[footprint], scene.transpose(1, 2, 0)[footprint])


def test_six_band_training_records_bands_statistics_and_scale(
    s2: tuple[Path, dict], trained: Path
) -> None:
    root, footprints = s2
    ckpt = load_checkpoint(trained / "best.pt")
    assert ckpt["arch"]["in_channels"] == 6
    assert ckpt["bands"]["bands"] == [
        {"name": name, "index": i} for i, name in enumerate(S2_BAND_NAMES, start=1)
    ]
    assert ckpt["bands"]["dtype"] == "uint16" and ckpt["bands"]["nodata"] == "auto"
    assert ckpt["state_dict"]["backbone.0.0.weight"].shape[1] == 6

    # The statistics are the training split's valid pixels' mean and std (numpy as oracle),
    # written beside the data and stored in the checkpoint.
    valid = np.concatenate(
        [
            sentinel2_like_scene(angle)[0][:, fp]
            for angle, fp in zip(TRAIN_ANGLES, footprints["trainval"], strict=True)
        ],
        axis=1,
    ).astype(np.float64)
    norm = ckpt["normalization"]
    np.testing.assert_allclose(norm["mean"], valid.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(norm["std"], valid.std(axis=1), rtol=1e-9)
    assert norm["scale"] == 1.0
    assert json.loads((root / STATS_FILE).read_text())["normalization"] == norm

    # 1/15 degree at the equator.
    assert ckpt["gsd_m"] == pytest.approx(111_320 / 15, rel=1e-6)
    resolved = (trained / "config.yaml").read_text()
    assert "bands: [1, 2, 3, 4, 5, 6]" in resolved
    assert "1=B02 blue, 2=B03 green, 3=B04 red, 4=B08 nir" in resolved


def test_the_six_band_model_segments_its_scene_with_255_on_the_collar(
    s2: tuple[Path, dict], trained: Path
) -> None:
    root, footprints = s2
    predictor = Predictor.from_checkpoint(trained / "best.pt", InferenceOptions(device="cpu"))
    norm = predictor.normalization
    fill = [m * norm.scale for m in norm.mean]
    spec = bands_from_checkpoint(predictor.metadata)
    with open_for_model(root / "TEST_SET" / "IMAGES" / "chip0.tif", spec, fill=fill) as source:
        mask = predictor.predict(source).mask
    footprint = footprints["test"][0]
    assert (mask[~footprint] == 255).all()
    assert (mask[footprint] < 3).all()


def test_evaluate_counts_only_valid_pixels(
    s2: tuple[Path, dict], trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, footprints = s2
    out = tmp_path / "test.json"
    rc = evaluate_main(
        [
            "--checkpoint",
            str(trained / "best.pt"),
            "--data",
            str(root),
            "--json",
            str(out),
            "--device",
            "cpu",
            "--tile",
            "64",
            "--overlap",
            "16",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    valid = sum(int(fp.sum()) for fp in footprints["test"])
    assert int(np.sum(result["confusion_matrix"])) == valid
    total = sum(fp.size for fp in footprints["test"])
    assert valid < total - 1000  # the collars are large: counting them would show


def test_a_band_name_the_data_lack_is_refused_before_any_work(
    s2: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, _ = s2
    out = tmp_path / "runs"
    rc = fit_main(tiny_overrides(root, out, data__bands="[B04 red, B8 nir, B02 blue]"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "data.bands" in err and "'B8 nir'" in err and "B08 nir" in err
    assert not out.exists()


def test_data_bands_select_and_order_the_model_inputs(s2: tuple[Path, dict]) -> None:
    root, _ = s2
    lm = LabelMap.load()
    spec, _ = dataset_band_spec(root, ["B08 nir", "B04 red", 2])
    assert spec.indexes == (4, 3, 2) and spec.names == ("B08 nir", "B04 red", "B03 green")
    image, _ = SegmentationDataset(collect_pairs(root, "test", lm), lm, spec=spec)[0]
    scene, footprint = sentinel2_like_scene(TEST_ANGLES[0])
    np.testing.assert_array_equal(image[footprint], scene[[3, 2, 1]].transpose(1, 2, 0)[footprint])


def test_resuming_with_other_bands_is_refused(
    s2: tuple[Path, dict], trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, _ = s2
    overrides = {"train__resume": str(trained / "last.pt"), "data__bands": "[3, 2, 1]"}
    rc = fit_main(tiny_overrides(root, tmp_path / "runs", **overrides))
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.resume" in err and "1=B02 blue" in err and "3=B04 red, 2=B03 green" in err


def test_the_service_answers_255_on_the_collar_with_the_trained_model(
    s2: tuple[Path, dict], trained: Path
) -> None:
    """The checkpoint the trainer wrote, served: no class on the collar in any format."""
    from pycocotools import mask as coco_mask
    from rasterio.features import rasterize
    from rasterio.io import MemoryFile
    from shapely.geometry import shape

    from tests.service.helpers import png_mask, running_app, settings_for

    root, footprints = s2
    chip = (root / "TEST_SET" / "IMAGES" / "chip0.tif").read_bytes()
    footprint = footprints["test"][0]
    collar = ~footprint

    def segment(client, **params: str):
        response = client.post("/segment", params=params, files={"image": ("chip0.tif", chip)})
        assert response.status_code == 200, response.text
        return response

    def read(data: bytes) -> tuple[np.ndarray, float | None]:
        with MemoryFile(data) as memfile, memfile.open() as src:
            return src.read(), src.nodata

    with running_app(settings_for(trained / "best.pt")) as client:
        mask = png_mask(segment(client).content)
        assert (mask[collar] == 255).all() and (mask[footprint] < 3).all()

        covered = np.zeros_like(footprint)
        for cls in segment(client, format="rle").json()["classes"]:
            rle = {"size": cls["rle"]["size"], "counts": cls["rle"]["counts"].encode()}
            covered |= coco_mask.decode(rle).astype(bool)
        np.testing.assert_array_equal(covered, footprint)

        values, nodata = read(segment(client, format="geotiff").content)
        assert nodata == 255
        np.testing.assert_array_equal(values[0], mask)

        probabilities, _ = read(segment(client, format="probabilities").content)
        assert (probabilities[:, collar] == 0).all()
        assert (probabilities[:, footprint].astype(int).sum(axis=0) == 255).all()

        features = segment(client, format="geojson").json()["features"]
        drawn = rasterize(
            [(shape(f["geometry"]), 1) for f in features],
            out_shape=footprint.shape,
            transform=TILE_TRANSFORM,
        ).astype(bool)
        np.testing.assert_array_equal(drawn, footprint)


@pytest.mark.parametrize(
    ("rule", "collar_ignored"),
    [("auto", True), ("none", False), (0, True), (65535, False)],
)
def test_data_nodata_decides_which_pixels_are_ignore_index(
    s2: tuple[Path, dict], rule: object, collar_ignored: bool
) -> None:
    """``data.nodata`` as the trainer resolves it: ``none`` keeps the collar's labels, a value
    marks the pixels holding it in every band (0: the collar; 65535: nothing here)."""
    from trainer.build import resolve_data_bands
    from trainer.config import load_config

    root, footprints = s2
    cfg = load_config(None, [f"data.root={root}", f"data.nodata={rule}"])
    spec, _ = resolve_data_bands(cfg)
    lm = LabelMap.load()
    dataset = SegmentationDataset(
        collect_pairs(root, "trainval", lm), lm, spec=spec, fill=[0.0] * 6
    )
    _, mask = dataset[0]
    collar = ~footprints["trainval"][0]
    expected = lm.ignore_index if collar_ignored else FILE_CLASS_ON_COLLAR
    assert (mask[collar] == expected).all()
    assert (mask[~collar] != lm.ignore_index).all()

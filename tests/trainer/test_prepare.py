"""The Blue Marble builder (on a tiny synthetic globe and on the real data) and `prepare check`."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from scipy import ndimage

from shared.imaging import encode_png, read_image, read_mask
from shared.labels import LabelMap
from shared.preprocess import STATS_FILE
from tests.geodata import geotiff_bytes
from trainer.dataset_layout import find_pairs, validate_dataset
from trainer.prepare import (
    BuildOptions,
    PrepareError,
    build_dataset,
    decode_gshhg_mask,
    load_bluemarble,
    load_relief,
    main,
    mark_sea_like_lakes,
    plan_tiles,
    relief_band,
    resample_nearest,
    tile_origins,
)

REPO = Path(__file__).resolve().parents[2]

# A 48x96 globe: 3.75 degrees per pixel. With these options the usable rows are 8..40
# (|lat| <= 60) and the holdout band 90E..180E is columns 72..96.
SMALL = BuildOptions(tile=8, stride=4, holdout_lon_min=90, holdout_lon_max=180, max_abs_lat=60)


def _globe() -> tuple[np.ndarray, np.ndarray]:
    """(48,96,3) image and (48,96) mask: two continents, two lakes, polar caps of land."""
    mask = np.zeros((48, 96), np.uint8)
    mask[:8] = 1  # polar caps, outside |lat| <= 60: must never appear in a tile
    mask[40:] = 1
    mask[8:24, 10:30] = 1  # training continent
    mask[20, 20] = 2  # lake inside it
    mask[36, 50] = 2  # lake alone in open ocean: its tile must survive the thinning
    mask[16:32, 76:90] = 1  # holdout continent
    mask[24, 80] = 2
    rng = np.random.default_rng(0)
    image = (LabelMap.load().colors[mask] // 2 + rng.integers(0, 60, (48, 96, 3))).astype(np.uint8)
    return image, mask


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- pure helpers


def test_gshhg_mask_is_flipped_so_north_is_row_zero() -> None:
    stored = np.array([[1, 1, 1, 1], [0, 2, 0, 0]], np.uint8)  # row 0 = south pole
    mask = decode_gshhg_mask(gzip.compress(stored.tobytes()), shape=(2, 4))
    assert mask.tolist() == [[0, 2, 0, 0], [1, 1, 1, 1]]


def test_gshhg_mask_of_wrong_size_is_refused() -> None:
    with pytest.raises(PrepareError, match="expected 2x4"):
        decode_gshhg_mask(gzip.compress(b"\0" * 7), shape=(2, 4))


def test_resample_nearest_takes_the_cell_under_each_pixel_centre() -> None:
    # Real ratio 8640 -> 5400 columns is 1.6; centres (j + .5) * 1.6 fall in cells 0, 2, 4, 5, 7.
    assert resample_nearest(np.arange(8)[None, :], 1, 5).tolist() == [[0, 2, 4, 5, 7]]
    up = resample_nearest(np.array([[0, 1], [2, 0]]), 4, 4)
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]]


def test_tile_origins_cover_the_range_with_the_last_tile_flush() -> None:
    assert tile_origins(0, 10, 4, 3) == [0, 3, 6]
    assert tile_origins(0, 11, 4, 3) == [0, 3, 6, 7]
    assert tile_origins(5, 9, 4, 4) == [5]
    assert tile_origins(5, 8, 4, 4) == []


def test_bad_options_are_refused() -> None:
    with pytest.raises(PrepareError, match="--stride"):
        BuildOptions(stride=300).validate()
    with pytest.raises(PrepareError, match="holdout"):
        BuildOptions(holdout_lon_min=120, holdout_lon_max=100).validate()


# ----------------------------------------------------------------------------- tiling plan


def test_plan_keeps_splits_apart_and_inside_the_latitude_band() -> None:
    _, mask = _globe()
    tiles, stats = plan_tiles(mask, SMALL)
    covered = {split: np.zeros(mask.shape, bool) for split in ("trainval", "test")}
    for t in tiles:
        assert t.row >= 8 and t.row + 8 <= 40
        in_band = t.col >= 72 and t.col + 8 <= 96
        outside = t.col + 8 <= 72
        assert in_band if t.split == "test" else outside, t
        covered[t.split][t.row : t.row + 8, t.col : t.col + 8] = True
    assert not (covered["test"] & covered["trainval"]).any()
    assert {t.split for t in tiles} == {"trainval", "test"}
    assert stats["test"].pairs == sum(t.split == "test" for t in tiles)
    assert all(s.class_pixels[2] > 0 for s in stats.values())  # lakes in both splits


def test_plan_thins_mostly_ocean_tiles_but_keeps_lake_tiles() -> None:
    _, mask = _globe()
    everything, _ = plan_tiles(mask, replace(SMALL, ocean_keep=1.0))
    # rows 8..32 step 4 -> 7 origins; trainval cols 0..64 step 4 -> 17, test 72..88 -> 5
    assert len(everything) == 7 * (17 + 5)
    none_kept, stats = plan_tiles(mask, replace(SMALL, ocean_keep=0.0))
    for t in none_kept:
        window = mask[t.row : t.row + 8, t.col : t.col + 8]
        assert (window != 0).any()
    assert any(t.row <= 36 < t.row + 8 and t.col <= 50 < t.col + 8 for t in none_kept)
    dropped = sum(s.ocean_tiles_dropped for s in stats.values())
    assert len(none_kept) + dropped == len(everything)
    half, _ = plan_tiles(mask, SMALL)  # default keep 0.25: somewhere in between, reproducibly
    assert len(none_kept) < len(half) < len(everything)
    assert plan_tiles(mask, SMALL)[0] == half


# ----------------------------------------------------------------------------- writing


def test_build_writes_matching_pairs_that_pass_validation(tmp_path: Path) -> None:
    image, mask = _globe()
    out = tmp_path / "ds"
    stats = build_dataset(image, mask, out, SMALL)
    for split, folder in (("trainval", "TAIN_VAL_SET"), ("test", "TEST_SET")):
        pairs = find_pairs(out, split)
        assert len(pairs) == stats[split].pairs
        for image_path, mask_path in pairs:
            assert image_path.parent == out / folder / "IMAGES" and image_path.suffix == ".jpg"
            row, col = (int(part[1:]) for part in mask_path.stem.split("_"))
            assert read_mask(mask_path).tolist() == mask[row : row + 8, col : col + 8].tolist()
            crop = image[row : row + 8, col : col + 8].astype(int)
            assert np.abs(read_image(image_path).astype(int) - crop).mean() < 8  # JPEG q95
    assert validate_dataset(out, LabelMap.load()) == []
    info = json.loads((out / "dataset.json").read_text())
    assert info["splits"]["test"]["pairs"] == stats["test"].pairs
    assert info["options"]["holdout_lon_min"] == 90
    assert "LGPL-3.0-or-later" in json.dumps(info["licences"])


def test_rebuild_is_byte_identical_and_leaves_no_stale_tiles(tmp_path: Path) -> None:
    image, mask = _globe()
    out = tmp_path / "ds"
    build_dataset(image, mask, out, SMALL)
    first = _tree_digest(out)
    build_dataset(image, mask, out, SMALL)
    assert _tree_digest(out) == first
    build_dataset(image, mask, out, replace(SMALL, stride=8))
    assert len(_tree_digest(out)) < len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging folders left


def test_build_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    image, mask = _globe()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not empty"):
        build_dataset(image, mask, tmp_path, SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_out_under_a_file_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bluemarble", "--out", str(blocker / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- check


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    image, mask = _globe()
    build_dataset(image, mask, tmp_path / "ds", SMALL)
    return tmp_path / "ds"


def test_check_passes_a_clean_dataset(small_dataset: Path, capsys) -> None:
    assert main(["check", str(small_dataset)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "trainval" in out


def test_check_names_each_bad_file_and_exits_1(small_dataset: Path, capsys) -> None:
    train = small_dataset / "TAIN_VAL_SET"
    corrupt, unknown, resized, orphan = (
        img for img, _ in find_pairs(small_dataset, "trainval")[:4]
    )
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # truncated JPEG
    unknown_mask = train / "MASKS" / f"{unknown.stem}.png"
    unknown_mask.write_bytes(encode_png(np.full((8, 8), 7, np.uint8)))
    resized_mask = train / "MASKS" / f"{resized.stem}.png"
    resized_mask.write_bytes(encode_png(np.zeros((8, 6), np.uint8)))
    (train / "MASKS" / f"{orphan.stem}.png").unlink()

    assert main(["check", str(small_dataset)]) == 1
    lines = capsys.readouterr().out.splitlines()
    named = {line.split(": ", 1)[0]: line for line in lines[:-1]}
    assert set(named) == {str(corrupt), str(unknown_mask), str(resized_mask), str(orphan)}
    assert "[7]" in named[str(unknown_mask)]
    assert "image has no mask" in named[str(orphan)]
    assert lines[-1].startswith("4 problem(s) in 4 file(s)")


def test_check_missing_folder_exits_2_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", "check", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: dataset folder not found: {tmp_path / 'absent'}"


# ----------------------------------------------------------------------------- real data


def test_real_mask_sits_on_the_real_coasts() -> None:
    image, mask, _ = load_bluemarble()
    assert image.shape == (2700, 5400, 3) and mask.shape == (2700, 5400)

    def at(lat: float, lon: float) -> int:
        return int(mask[int((90 - lat) * 15), int((lon + 180) * 15)])

    assert at(0, 20) == 1  # Congo basin
    assert at(0, -150) == 0  # Pacific
    assert at(36, -30) == 0  # Atlantic
    assert at(47.7, -87.5) == 2  # Lake Superior
    assert at(-1, 33) == 2  # Lake Victoria
    assert at(-25, 135) == 1  # central Australia

    # A crude "looks like water" test on the pixels agrees best with the mask unshifted:
    # an off-by-one in either axis, a 180-degree longitude error or a missed flip all score lower.
    band = image[300:2400].astype(np.int16)
    looks_wet = band[..., 2] > band[..., 0] + 20
    wet = mask != 1

    def agreement(labels: np.ndarray) -> float:
        return float((labels[300:2400] == looks_wet).mean())

    aligned = agreement(wet)
    for shift in ((0, 1), (0, -1), (1, 0), (-1, 0), (0, 2700)):
        assert aligned > agreement(np.roll(wet, shift, axis=(0, 1))), shift
    assert aligned > agreement(wet[::-1])


def test_the_caspian_sea_is_ignore_and_every_other_lake_stays_lake() -> None:
    _, mask, _ = load_bluemarble()
    marked = mark_sea_like_lakes(mask, 255)

    def at(labels: np.ndarray, lat: float, lon: float) -> int:
        return int(labels[int((90 - lat) * 15), int((lon + 180) * 15)])

    assert at(mask, 42.0, 51.0) == 2 and at(marked, 42.0, 51.0) == 255  # mid-Caspian
    assert at(marked, 47.7, -87.5) == 2  # Lake Superior
    assert at(marked, 45.0, 60.0) == 2  # the Aral Sea, east of the box
    assert at(marked, 40.96, 46.66) == 2  # the Mingachevir reservoir, inside it
    changed = mask != marked
    assert (mask[changed] == 2).all()  # only lake pixels change
    assert changed.sum() > 4000  # the whole Caspian: ~370,000 km2 at ~50 km2 a pixel
    # The Caspian alone: one 8-connected component.
    _, components = ndimage.label(changed, structure=np.ones((3, 3)))
    assert components == 1


def test_real_default_build_meets_the_dataset_targets(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bluemarble"
    assert main(["bluemarble", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "TAIN_VAL_SET" in printed and "lake" in printed

    labels = LabelMap.load()
    coverage = {}
    for split, minimum in (("trainval", 150), ("test", 30)):
        pairs = find_pairs(out, split)
        assert len(pairs) >= minimum
        counts = np.zeros(256, np.int64)
        covered = np.zeros((2700, 5400), bool)
        for _, mask_path in pairs:
            values = read_mask(mask_path)
            assert values.shape == (256, 256)
            counts += np.bincount(values.ravel(), minlength=256)
            row, col = (int(part[1:]) for part in mask_path.stem.split("_"))
            covered[row : row + 256, col : col + 256] = True
        # The Caspian Sea (training longitudes) is ignore, neither lake nor ocean.
        expected = {0, 1, 2, labels.ignore_index} if split == "trainval" else {0, 1, 2}
        assert set(np.flatnonzero(counts)) == expected, split
        coverage[split] = covered
    assert not (coverage["trainval"] & coverage["test"]).any()
    assert validate_dataset(out, labels) == []

    first = _tree_digest(out)
    assert main(["bluemarble", "--out", str(out)]) == 0
    assert _tree_digest(out) == first


# ----------------------------------------------------------------------------- bands

RELIEF_NAMES = ("red", "green", "blue", "relief")


def _globe4() -> tuple[np.ndarray, np.ndarray]:
    """The small globe with a fourth band that differs from every colour band."""
    image, mask = _globe()
    relief = (np.arange(48 * 96).reshape(48, 96) % 251).astype(np.uint8)
    return np.concatenate([image, relief[..., None]], axis=2), mask


@pytest.fixture
def relief_dataset(tmp_path: Path) -> Path:
    image, mask = _globe4()
    build_dataset(image, mask, tmp_path / "relief", SMALL, band_names=RELIEF_NAMES)
    return tmp_path / "relief"


def test_multiband_build_writes_georeferenced_lossless_geotiffs(relief_dataset: Path) -> None:
    image, mask = _globe4()
    degrees = 360 / 96  # the small globe's pixel size
    for split in ("trainval", "test"):
        pairs = find_pairs(relief_dataset, split)
        assert pairs
        for image_path, mask_path in pairs:
            assert image_path.suffix == ".tif"
            row, col = (int(part[1:]) for part in image_path.stem.split("_"))
            with rasterio.open(image_path) as src:
                assert (src.count, src.dtypes[0], src.crs.to_epsg()) == (4, "uint8", 4326)
                assert src.descriptions == RELIEF_NAMES
                assert ColorInterp.alpha not in src.colorinterp
                # Top-left corner of the tile in lon/lat, computed by hand from its place.
                assert src.transform @ (0, 0) == pytest.approx(
                    (-180 + col * degrees, 90 - row * 180 / 48)
                )
                assert src.res == pytest.approx((degrees, 180 / 48))
                assert np.array_equal(
                    np.moveaxis(src.read(), 0, 2), image[row : row + 8, col : col + 8]
                )
            assert read_mask(mask_path).tolist() == mask[row : row + 8, col : col + 8].tolist()
    assert validate_dataset(relief_dataset, LabelMap.load()) == []
    info = json.loads((relief_dataset / "dataset.json").read_text())
    assert info["images"]["bands"] == list(RELIEF_NAMES) and info["images"]["crs"] == "EPSG:4326"


def test_multiband_rebuild_is_byte_identical(relief_dataset: Path) -> None:
    first = _tree_digest(relief_dataset)
    image, mask = _globe4()
    build_dataset(image, mask, relief_dataset, SMALL, band_names=RELIEF_NAMES)
    assert _tree_digest(relief_dataset) == first


def test_multiband_build_refuses_a_band_count_mismatch(tmp_path: Path) -> None:
    image, mask = _globe4()
    with pytest.raises(PrepareError, match=r"\(3 bands\) and mask"):
        build_dataset(image, mask, tmp_path / "ds", SMALL, band_names=RELIEF_NAMES[:3])


def test_check_reports_bands_per_split(relief_dataset: Path, capsys) -> None:
    assert main(["check", str(relief_dataset)]) == 0
    out = capsys.readouterr().out
    for split in ("trainval", "test"):
        assert f"{split} " in out
    assert out.count("4 bands uint8 (red, green, blue, relief), nodata tag none") == 2


def test_check_refuses_files_whose_bands_disagree(relief_dataset: Path, capsys) -> None:
    odd = find_pairs(relief_dataset, "test")[0][0]
    with rasterio.open(odd) as src:
        profile, data = src.profile, src.read()
    profile.update(count=3, dtype="uint16", nodata=0)
    with rasterio.open(odd, "w", **profile) as dst:
        dst.write(data[:3].astype(np.uint16))
    assert main(["check", str(relief_dataset)]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if "other images have" in line]
    assert len(problems) == 1 and problems[0].startswith(f"{odd}: 3 bands uint16")
    assert "nodata tag 0" in problems[0]
    assert "other images have 4 bands uint8 (red, green, blue, relief)" in problems[0]
    # The image decoder refuses the 16-bit file too; both lines name the one file.
    assert "in 1 file(s)" in out.splitlines()[-1]


def test_stats_match_numpy_over_the_training_tiles(relief_dataset: Path, capsys) -> None:
    assert main(["stats", str(relief_dataset)]) == 0
    stats = json.loads((relief_dataset / STATS_FILE).read_text())
    tiles = []
    for image_path, _ in find_pairs(relief_dataset, "trainval"):
        with rasterio.open(image_path) as src:
            tiles.append(src.read().reshape(4, -1))
    pixels = np.concatenate(tiles, axis=1).astype(np.float64)
    assert stats["bands"]["bands"] == [
        {"name": n, "index": i} for i, n in enumerate(RELIEF_NAMES, 1)
    ]
    np.testing.assert_allclose(stats["normalization"]["mean"], pixels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats["normalization"]["std"], pixels.std(axis=1), rtol=1e-9)
    assert stats["normalization"]["scale"] == 1.0
    assert stats["files"] == len(tiles)
    assert "band 4 relief" in capsys.readouterr().out


def _collar_dataset(root: Path) -> tuple[Path, np.ndarray]:
    """Two 16-bit 2-band training scenes with an untagged zero collar, and their valid pixels."""
    rows, cols = np.mgrid[0:12, 0:12]
    inside = np.abs(rows - 5.5) + np.abs(cols - 5.5) <= 6  # a rotated (diamond) footprint
    valid = []
    for i, name in enumerate(("a", "b")):
        data = np.stack([1000 + 10 * rows + cols + i, 3000 - rows * cols]).astype(np.uint16)
        data[:, ~inside] = 0
        data[:, 5, 5] = 0  # an interior zero: data, not collar
        folder = root / "TAIN_VAL_SET"
        for sub in ("IMAGES", "MASKS"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "IMAGES" / f"{name}.tif").write_bytes(geotiff_bytes(data))
        (folder / "MASKS" / f"{name}.png").write_bytes(encode_png(np.zeros((12, 12), np.uint8)))
        keep = inside.copy()
        keep[5, 5] = True
        valid.append(data[:, keep])
    return root, np.concatenate(valid, axis=1).astype(np.float64)


def test_stats_exclude_the_nodata_collar(tmp_path: Path) -> None:
    root, valid = _collar_dataset(tmp_path / "s2")
    assert main(["stats", str(root), "--bands", "2,1"]) == 0
    stats = json.loads((root / STATS_FILE).read_text())
    np.testing.assert_allclose(stats["normalization"]["mean"], valid[::-1].mean(axis=1))
    np.testing.assert_allclose(stats["normalization"]["std"], valid[::-1].std(axis=1))
    assert stats["valid_pixels"] == [valid.shape[1]] * 2
    assert stats["bands"]["dtype"] == "uint16"
    # nodata=none counts the collar, and the mean drops towards 0.
    assert main(["stats", str(root), "--nodata", "none"]) == 0
    everything = json.loads((root / STATS_FILE).read_text())
    assert everything["normalization"]["mean"][0] < stats["normalization"]["mean"][1]


def test_stats_errors_name_the_band_or_file(tmp_path: Path, capsys) -> None:
    root, _ = _collar_dataset(tmp_path / "s2")
    assert main(["stats", str(root), "--bands", "3"]) == 2
    err = capsys.readouterr().err
    assert "a.tif" in err and "band 3 does not exist" in err and "Traceback" not in err
    assert main(["stats", str(root), "--nodata", "zero"]) == 2
    assert "nodata must be 'auto', 'none' or a number" in capsys.readouterr().err
    (root / "TAIN_VAL_SET" / "IMAGES" / "b.tif").write_bytes(
        geotiff_bytes(np.zeros((3, 12, 12), np.uint16))
    )
    assert main(["stats", str(root)]) == 2
    err = capsys.readouterr().err
    assert "b.tif: 3 bands uint16, but a.tif has 2 bands uint16" in err


def test_real_relief_band_rises_with_elevation() -> None:
    relief, source = load_relief((2700, 5400))
    assert relief.shape == (2700, 5400) and relief.dtype == np.uint8
    assert source["file"] == "etopo1.jpg" and len(source["sha256"]) == 64

    def median(lat0: float, lat1: float, lon0: float, lon1: float) -> float:
        box = relief[
            int((90 - lat1) * 15) : int((90 - lat0) * 15),
            int((lon0 + 180) * 15) : int((lon1 + 180) * 15),
        ]
        return float(np.median(box))

    deep_pacific = median(-20, 0, -150, -130)
    caspian = median(39, 43, 50, 52)
    amazon = median(-8, -3, -65, -55)
    sahara = median(20, 25, 0, 10)
    tibet = median(31, 35, 82, 92)
    assert deep_pacific < caspian < amazon < sahara < tibet


def test_real_relief_is_aligned_with_the_mosaic_grid() -> None:
    # The relief's land (above the shallow-water part of the ramp) agrees best with the GSHHG
    # land mask, which sits on the mosaic's coasts (test above), when not shifted at all.
    _, mask, _ = load_bluemarble()
    relief, _ = load_relief(mask.shape)
    rows = slice(300, 2400)
    land = mask[rows] == 1

    def agreement(shift: tuple[int, int]) -> float:
        return float((np.roll(relief >= 50, shift, axis=(0, 1))[rows] == land).mean())

    aligned = agreement((0, 0))
    assert aligned > 0.95
    for shift in ((0, 1), (0, -1), (1, 0), (-1, 0), (2, 2), (0, 2700)):
        assert aligned > agreement(shift), shift


def test_relief_band_orders_the_tint_colours() -> None:
    # Median ETOPO1 tint colours of the deep Pacific, the Caspian, the Amazon, the Sahara and
    # Tibet: deepest sea to highest ground.
    ramp = np.array(
        [[[16, 122, 215], [153, 219, 244], [73, 181, 87], [229, 193, 141], [156, 138, 138]]],
        dtype=np.uint8,
    )
    values = relief_band(ramp)[0].tolist()
    assert values == sorted(values) and len(set(values)) == 5


def test_cli_unknown_band_set_is_a_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bluemarble", "--bands", "rgb+nir", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "rgb+relief" in capsys.readouterr().err


def test_stats_on_rgb_jpeg_tiles_note_imagenet(small_dataset: Path, capsys) -> None:
    assert main(["stats", str(small_dataset)]) == 0
    out = capsys.readouterr().out
    assert "8-bit RGB: training keeps the ImageNet mean and std" in out
    stats = json.loads((small_dataset / STATS_FILE).read_text())
    assert [b["name"] for b in stats["bands"]["bands"]] == ["red", "green", "blue"]
    pixels = np.concatenate(
        [read_image(p).reshape(-1, 3) for p, _ in find_pairs(small_dataset, "trainval")]
    ).astype(np.float64)
    assert stats["valid_pixels"] == [len(pixels)] * 3
    # GDAL's JPEG decoder and Pillow's may differ by one level on a few pixels.
    np.testing.assert_allclose(stats["normalization"]["mean"], pixels.mean(axis=0), rtol=1e-4)

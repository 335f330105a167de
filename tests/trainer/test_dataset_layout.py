"""Finding image/mask pairs in the workshop layout and validating them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.imaging import encode_png
from shared.labels import LabelMap
from trainer.dataset_layout import (
    DatasetLayoutError,
    check_dataset,
    find_pairs,
    scan_split,
    split_dir,
    validate_dataset,
)

LABELS = LabelMap.from_dict(
    {
        "ignore_index": 255,
        "classes": [
            {"id": 0, "name": "ocean", "color": [0, 0, 255]},
            {"id": 1, "name": "land", "color": [0, 255, 0]},
            {"id": 2, "name": "lake", "color": [0, 255, 255]},
        ],
    }
)


def _write_pair(split: Path, stem: str, mask: np.ndarray, image_hw: tuple[int, int] | None = None):
    """Write IMAGES/<stem>.png (grey) and MASKS/<stem>.png (index mask)."""
    h, w = image_hw or mask.shape[:2]
    (split / "IMAGES").mkdir(parents=True, exist_ok=True)
    (split / "MASKS").mkdir(parents=True, exist_ok=True)
    (split / "IMAGES" / f"{stem}.png").write_bytes(encode_png(np.full((h, w, 3), 90, np.uint8)))
    (split / "MASKS" / f"{stem}.png").write_bytes(encode_png(mask.astype(np.uint8)))


def _dataset(root: Path, train_split: str = "TAIN_VAL_SET") -> Path:
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)  # every class plus one ignored pixel
    for stem in ("b", "a"):
        _write_pair(root / train_split, stem, mask)
    _write_pair(root / "TEST_SET", "t", mask)
    return root


def test_find_pairs_matches_by_stem_sorted(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    pairs = find_pairs(root, "trainval")
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.png", "b.png")]
    assert pairs[0][0].parent == root / "TAIN_VAL_SET" / "IMAGES"
    assert pairs[0][1].parent == root / "TAIN_VAL_SET" / "MASKS"
    assert [i.name for i, _ in find_pairs(root, "test")] == ["t.png"]


def test_find_pairs_accepts_train_spelling_and_mixed_suffixes(tmp_path: Path) -> None:
    root = _dataset(tmp_path, train_split="TRAIN_VAL_SET")
    images = root / "TRAIN_VAL_SET" / "IMAGES"
    (images / "a.png").rename(images / "a.JPG")  # suffix case does not matter
    assert [i.name for i, _ in find_pairs(root, "trainval")] == ["a.JPG", "b.png"]


def test_hidden_files_are_skipped(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    (root / "TEST_SET" / "IMAGES" / ".DS_Store").write_bytes(b"\0")
    assert len(find_pairs(root, "test")) == 1
    assert scan_split(root, "test").unsupported_files == []


def test_missing_split_names_the_expected_folder(tmp_path: Path) -> None:
    (tmp_path / "TEST_SET").mkdir()
    with pytest.raises(DatasetLayoutError, match="TAIN_VAL_SET or .*TRAIN_VAL_SET") as err:
        find_pairs(tmp_path, "trainval")
    assert err.value.path == tmp_path


def test_missing_root_and_missing_masks_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="dataset folder not found"):
        find_pairs(tmp_path / "nope", "test")
    (tmp_path / "TEST_SET" / "IMAGES").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"missing folder: .*TEST_SET/MASKS"):
        find_pairs(tmp_path, "test")


def test_both_train_spellings_is_ambiguous(tmp_path: Path) -> None:
    _dataset(tmp_path)
    _dataset(tmp_path, train_split="TRAIN_VAL_SET")
    with pytest.raises(DatasetLayoutError, match="ambiguous"):
        split_dir(tmp_path, "trainval")


def test_unknown_split_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'val'"):
        split_dir(tmp_path, "val")


def test_unmatched_and_empty_splits_raise_naming_the_folder(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    (root / "TAIN_VAL_SET" / "MASKS" / "a.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"TAIN_VAL_SET: 1 images without a mask: a.png"):
        find_pairs(root, "trainval")
    for sub in ("IMAGES", "MASKS"):
        (root / "TEST_SET" / sub / "t.png").unlink()
    with pytest.raises(DatasetLayoutError, match="TEST_SET: no image/mask pairs"):
        find_pairs(root, "test")


def test_duplicate_stems_are_an_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    images = root / "TEST_SET" / "IMAGES"
    (images / "t.jpg").write_bytes((images / "t.png").read_bytes())
    with pytest.raises(DatasetLayoutError, match="files sharing a stem: t.png"):
        find_pairs(root, "test")


def test_check_dataset_clean_counts_classes(tmp_path: Path) -> None:
    report = check_dataset(_dataset(tmp_path), LABELS)
    assert report.problems == []
    assert report.pairs == {"trainval": 2, "test": 1}
    assert report.class_pixels["trainval"].tolist() == [2, 2, 2]
    assert report.ignored_pixels["trainval"] == 2


def test_validate_names_each_bad_file(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    train = root / "TAIN_VAL_SET"
    (train / "IMAGES" / "a.png").write_bytes(b"this is text, not a PNG")
    _write_pair(train, "b", np.array([[0, 7], [1, 1]]))  # 7 is no class
    _write_pair(train, "c", np.zeros((2, 2)), image_hw=(3, 2))  # sizes differ
    (train / "IMAGES" / "d.png").write_bytes((train / "IMAGES" / "c.png").read_bytes())
    (train / "MASKS" / "e.png").write_bytes(encode_png(np.zeros((2, 2), np.uint8)))
    (train / "MASKS" / "f.jpg").write_bytes(b"jpeg masks are lossy")

    problems = {
        (p.path.relative_to(root).as_posix(), p.reason) for p in validate_dataset(root, LABELS)
    }
    paths = sorted(path for path, _ in problems)
    assert paths == [
        "TAIN_VAL_SET/IMAGES/a.png",
        "TAIN_VAL_SET/IMAGES/d.png",
        "TAIN_VAL_SET/MASKS/b.png",
        "TAIN_VAL_SET/MASKS/c.png",
        "TAIN_VAL_SET/MASKS/e.png",
        "TAIN_VAL_SET/MASKS/f.jpg",
    ]
    reasons = dict(problems)
    assert reasons["TAIN_VAL_SET/IMAGES/a.png"].startswith("image does not decode")
    assert "[7]" in reasons["TAIN_VAL_SET/MASKS/b.png"]
    assert "mask is 2x2 but image c.png is 2x3" in reasons["TAIN_VAL_SET/MASKS/c.png"]
    assert reasons["TAIN_VAL_SET/IMAGES/d.png"] == "image has no mask"
    assert reasons["TAIN_VAL_SET/MASKS/e.png"] == "mask has no image"
    assert "'.jpg' in MASKS/" in reasons["TAIN_VAL_SET/MASKS/f.jpg"]


def test_validate_reports_missing_split_and_accepts_colour_masks(tmp_path: Path) -> None:
    root = tmp_path
    colour = LABELS.to_color(np.array([[0, 1], [2, 2]]))
    _write_pair(root / "TAIN_VAL_SET", "rgb", colour)
    problems = validate_dataset(root, LABELS)
    assert [(p.path, "TEST_SET" in p.reason) for p in problems] == [(root, True)]
    assert validate_dataset(root, LABELS, splits=("trainval",)) == []

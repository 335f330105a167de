from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.conftest import CLASS_RGB, make_dataset, synthetic_pair
from trainer.config import AugmentConfig
from trainer.data import (
    DatasetError,
    SegmentationDataset,
    TrainSampler,
    build_train_transform,
    collate,
    collect_pairs,
    make_loaders,
    sampling_weights,
    split_train_val,
)

IGNORE = 255
ALL_ON = AugmentConfig(
    crop="random_resized",
    crop_scale=(0.3, 1.0),
    hflip=0.5,
    vflip=0.5,
    rotate90=0.5,
    affine=1.0,
    affine_scale=(0.7, 1.3),
    affine_rotate=30.0,
    affine_translate=0.1,
)


def interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one label and lies inside the crop: away from
    class edges (including ones just outside the crop), where the linearly resampled image
    legitimately blends colours while the mask, resampled nearest, does not."""
    padded = np.pad(mask, radius, mode="constant", constant_values=254)
    same = np.ones(mask.shape, dtype=bool)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + h, dx : dx + w] == mask
    return same


def colour_error(image: np.ndarray, mask: np.ndarray, where: np.ndarray) -> int:
    """Largest channel difference between the image and the colour its mask calls for."""
    return int(np.abs(image[where].astype(int) - CLASS_RGB[mask[where]].astype(int)).max())


@pytest.mark.parametrize("crop", ["random_resized", "random"])
def test_augmentations_keep_masks_aligned_and_in_the_label_set(crop: str) -> None:
    aug = AugmentConfig(**{**ALL_ON.__dict__, "crop": crop})
    transform = build_train_transform(aug, image_size=48, ignore_index=IGNORE)
    for seed in range(40):
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[8:40, 10:50] = 1
        mask[44:60, 4:20] = 2
        image = CLASS_RGB[mask]  # the image spells out its mask in colours
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        img, msk = out["image"], out["mask"]
        assert img.shape == (48, 48, 3) and msk.shape == (48, 48)
        assert set(np.unique(msk)) <= {0, 1, 2, IGNORE}
        # Where the mask says class c (away from edges), the image still shows c's colour.
        inside = interior(msk) & (msk != IGNORE)
        assert inside.sum() > 100
        # Upscaling blends a few levels of colour even two pixels from an edge; a misaligned
        # mask would be off by a whole class colour (>= 60 levels).
        assert colour_error(img, msk, inside) <= 10, f"seed {seed}"
        shifted = np.roll(msk, 3, axis=1)  # control: the check does catch a 3-pixel shift
        assert colour_error(img, shifted, interior(shifted) & (shifted != IGNORE)) > 50
        # Areas invented by padding / rotation are black in the image and ignored in the mask.
        invented = interior(msk) & (msk == IGNORE)
        assert np.all(img[invented] == 0)


def test_random_crop_pads_small_images_with_ignore() -> None:
    transform = build_train_transform(
        AugmentConfig(crop="random", hflip=0, vflip=0, rotate90=0),
        image_size=96,
        ignore_index=IGNORE,
    )
    mask = np.ones((64, 64), dtype=np.uint8)
    out = transform(image=CLASS_RGB[mask], mask=mask)
    assert out["mask"].shape == (96, 96)
    assert (out["mask"] == 1).sum() == 64 * 64  # every real pixel kept, at native resolution
    assert (out["mask"] == IGNORE).sum() == 96 * 96 - 64 * 64


def test_colour_jitter_changes_only_the_image() -> None:
    transform = build_train_transform(
        AugmentConfig(
            crop="random", hflip=0, vflip=0, rotate90=0, color_jitter=1.0, brightness=0.5
        ),
        image_size=64,
        ignore_index=IGNORE,
    )
    image, mask = synthetic_pair(np.random.default_rng(3), 64)
    transform.set_random_seed(1)
    out = transform(image=image, mask=mask)
    assert np.array_equal(out["mask"], mask)
    assert not np.array_equal(out["image"], image)


def test_per_sample_seed_fixes_the_augmentation(dataset: Path, lm) -> None:
    pairs = collect_pairs(dataset, "trainval", lm)
    ds = SegmentationDataset(pairs, lm, build_train_transform(ALL_ON, 32, IGNORE))
    a, b = ds[(0, 123)], ds[(0, 123)]
    c = ds[(0, 124)]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))


def test_validation_data_is_not_augmented(dataset: Path, lm) -> None:
    pairs = collect_pairs(dataset, "trainval", lm)
    ds = SegmentationDataset(pairs, lm, None)
    image, mask = ds[0]
    assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
    assert np.array_equal(ds[(0, 5)][0], image)


def test_cache_gives_the_same_arrays(dataset: Path, lm) -> None:
    pairs = collect_pairs(dataset, "trainval", lm)
    cached, fresh = SegmentationDataset(pairs, lm, cache=True), SegmentationDataset(pairs, lm)
    for i in range(len(pairs)):
        assert np.array_equal(cached[i][0], fresh[i][0])
        assert np.array_equal(cached[i][1], fresh[i][1])


def test_split_is_seeded_disjoint_and_complete() -> None:
    pairs = [(Path(f"i{i}"), Path(f"m{i}")) for i in range(20)]
    train, val = split_train_val(pairs, 0.25, seed=7)
    assert len(val) == 5 and len(train) == 15
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(pairs)
    assert split_train_val(pairs, 0.25, seed=7) == (train, val)
    assert split_train_val(pairs, 0.25, seed=8)[1] != val
    assert split_train_val(pairs, 0.0, seed=7) == (pairs, [])
    assert len(split_train_val(pairs[:3], 0.01, seed=0)[1]) == 1  # a positive share gets one


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    data = list(range(10))
    s = TrainSampler(data, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(i for i, _ in e0) == data  # a permutation
    assert list(s) == e0
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0)
    s.set_start(4)
    assert list(s) == e0[4:] and len(s) == 6


def test_sampler_splits_an_epoch_across_ranks() -> None:
    data = list(range(7))
    ranks = [TrainSampler(data, num_replicas=2, rank=r, seed=0) for r in range(2)]
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 4  # padded to an even share
    seen = {i for share in shares for i, _ in share}
    assert seen == set(data)


def test_weighted_sampler_oversamples() -> None:
    s = TrainSampler(
        list(range(3)), seed=0, weights=torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    )
    assert {i for i, _ in s} == {2}


def test_sampling_weights_take_the_largest_factor() -> None:
    presence = np.array([[True, True, False], [True, False, True], [False, True, True]])
    w = sampling_weights(presence, {"lake": 8.0, "land": 2.0}, ["ocean", "land", "lake"])
    assert w.tolist() == [2.0, 8.0, 8.0]
    assert sampling_weights(presence, {}, ["ocean", "land", "lake"]) is None


def test_collate_gives_channels_last_uint8() -> None:
    rng = np.random.default_rng(0)
    samples = [synthetic_pair(rng, 16) for _ in range(3)]
    images, masks = collate(samples)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert masks.shape == (3, 16, 16) and masks.dtype == torch.uint8
    assert torch.equal(images[1].permute(1, 2, 0), torch.from_numpy(samples[1][0]))
    mixed = collate([synthetic_pair(rng, 16), synthetic_pair(rng, 32)])
    assert isinstance(mixed[0], list) and mixed[0][1].shape == (1, 3, 32, 32)


def test_loaders_drop_incomplete_batches_and_shard_validation(dataset: Path, lm) -> None:
    pairs = collect_pairs(dataset, "trainval", lm)
    train, val = split_train_val(pairs, 0.25, seed=0)
    tfm = build_train_transform(AugmentConfig(), 32, IGNORE)
    loaders = make_loaders(
        SegmentationDataset(train, lm, tfm), SegmentationDataset(val, lm),
        batch_size=4, num_workers=0, seed=0, rank=1, world_size=2,
    )  # fmt: skip
    batches = list(loaders.train)
    assert all(images.shape[0] == 4 for images, _ in batches)
    assert sum(images.shape[0] for images, _ in loaders.val) == len(range(1, len(val), 2))


def test_too_few_samples_for_a_batch_is_a_clear_error(dataset: Path, lm) -> None:
    pairs = collect_pairs(dataset, "trainval", lm)[:3]
    with pytest.raises(DatasetError, match="fewer than train.batch_size=4"):
        make_loaders(SegmentationDataset(pairs, lm), None, batch_size=4, num_workers=0, seed=0)


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])  # a truncated PNG


def test_corrupt_image_is_named_before_training(tmp_path: Path, lm) -> None:
    root = make_dataset(tmp_path / "d", n_train=4)
    bad = root / "TAIN_VAL_SET" / "IMAGES" / "tile002.png"
    corrupt(bad)
    with pytest.raises(DatasetError, match="tile002.png"):
        collect_pairs(root, "trainval", lm)


def test_unknown_mask_values_are_named(tmp_path: Path, lm) -> None:
    from PIL import Image

    root = make_dataset(tmp_path / "d", n_train=4)
    bad = root / "TAIN_VAL_SET" / "MASKS" / "tile001.png"
    Image.fromarray(np.full((64, 64), 7, dtype=np.uint8), mode="L").save(bad)
    with pytest.raises(DatasetError, match=r"MASKS/tile001\.png"):
        collect_pairs(root, "trainval", lm)


def test_bad_files_can_be_skipped_with_a_warning(
    tmp_path: Path, lm, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_dataset(tmp_path / "d", n_train=4)
    corrupt(root / "TAIN_VAL_SET" / "IMAGES" / "tile002.png")
    with caplog.at_level(logging.WARNING):
        pairs = collect_pairs(root, "trainval", lm, on_bad_file="skip")
    assert [p[0].name for p in pairs] == ["tile000.png", "tile001.png", "tile003.png"]
    assert any("tile002.png" in r.getMessage() for r in caplog.records)


def test_focus_crops_contain_the_focus_class() -> None:
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[100:104, 10:14] = 2  # a 4x4 lake in a corner
    image = CLASS_RGB[mask]
    aug = AugmentConfig(crop="random_resized", crop_scale=(0.1, 0.1), focus_crop=1.0)
    focused = build_train_transform(aug, 32, IGNORE, num_classes=3, focus_ids=[2])
    plain = build_train_transform(
        AugmentConfig(crop="random_resized", crop_scale=(0.1, 0.1)), 32, IGNORE
    )
    hits = {"focused": 0, "plain": 0}
    for seed in range(30):
        for name, transform in (("focused", focused), ("plain", plain)):
            transform.set_random_seed(seed)
            out = transform(image=image, mask=mask)
            hits[name] += bool((out["mask"] == 2).any())
            assert out["mask"].shape == (32, 32)
    assert hits["focused"] == 30
    assert hits["plain"] < 10  # the lake covers 0.1% of the tile


def test_focus_crops_mix_with_normal_crops() -> None:
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[100:104, 10:14] = 2
    aug = AugmentConfig(crop="random", focus_crop=0.5, hflip=0, vflip=0, rotate90=0)
    transform = build_train_transform(aug, 32, IGNORE, num_classes=3, focus_ids=[2])
    hits = 0
    for seed in range(40):
        transform.set_random_seed(seed)
        hits += bool((transform(image=CLASS_RGB[mask], mask=mask)["mask"] == 2).any())
    assert 10 <= hits <= 32

"""Folder datasets in the workshop layout, their augmentations, sampler and loaders.

Images stay in their own dtype from disk to device (8-bit RGB: a quarter of the bytes of
float32; rasters: uint8, uint16, int16 or float32); normalisation happens on the device with
:func:`shared.preprocess.normalize`, the same preset the service uses. A batch is ``images``
(N,B,H,W) laid out channels-last and ``masks`` (N,H,W) uint8 ids.

Nodata pixels of a raster (:func:`trainer.dataset_layout.read_image_bands`) are
``ignore_index`` in its mask, so they carry no loss and no metric, and hold the band means in
the image (``fill``), as the service reads them, so fill values never reach the model.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from shared.bands import BandSpec
from shared.imaging import ImageError, read_image, read_mask
from shared.labels import LabelMap, MaskValueError
from trainer.config import AugmentConfig
from trainer.dataset_layout import find_pairs, read_image_bands, scan_split, validate_dataset

log = logging.getLogger(__name__)

Pair = tuple[Path, Path]
# The per-sample seed fits in an int32 because albumentations seeds numpy with it.
_SEED_LIMIT = 2**31 - 1
RGB_WORDS = ("red", "green", "blue")
# Listing every bad file of a large dataset in one exception message helps nobody.
_MAX_LISTED = 10


class DatasetError(ValueError):
    """The dataset cannot be used as it is; the message names the offending files."""


# --- finding and checking the files ------------------------------------------------------------


def collect_pairs(
    root: str | Path, split: str, label_map: LabelMap, *, on_bad_file: str = "error"
) -> list[Pair]:
    """The (image, mask) pairs of ``split`` ("trainval" or "test"), every file checked first.

    Each image and mask is decoded once (:func:`trainer.dataset_layout.validate_dataset`):
    corrupt files, masks with values outside ``label_map`` and size mismatches are found here,
    before training starts. ``on_bad_file="error"`` raises :class:`DatasetError` naming the files;
    ``"skip"`` logs a warning per file and leaves those pairs out.
    """
    problems = validate_dataset(root, label_map, splits=(split,))
    if on_bad_file == "error":
        if problems:
            listed = "; ".join(str(p) for p in problems[:_MAX_LISTED])
            more = (
                f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
            )
            raise DatasetError(f"{len(problems)} bad file(s) in {root} [{split}]: {listed}{more}")
        return find_pairs(root, split)
    bad = {p.path for p in problems}
    for problem in problems:
        log.warning("skipping %s", problem)
    pairs = [(i, m) for i, m in scan_split(root, split).pairs if i not in bad and m not in bad]
    if not pairs:
        raise DatasetError(f"{root} [{split}]: no usable image/mask pairs left after skipping")
    return pairs


def split_train_val(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle of ``pairs`` into (train, val); val gets ``round(n * val_fraction)`` pairs,
    at least one when the fraction is positive and at least one stays for training."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = round(len(pairs) * val_fraction)
    if val_fraction > 0:
        n_val = max(1, n_val)
    n_val = min(n_val, len(pairs) - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [pairs[i] for i in train], [pairs[i] for i in val]


def load_pair(
    image_path: Path,
    mask_path: Path,
    label_map: LabelMap,
    spec: BandSpec | None = None,
    fill: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair: (H,W,B) image and (H,W) uint8 class ids.

    Without ``spec`` the image is decoded as (H,W,3) uint8 RGB. With it, its bands are read by
    :func:`trainer.dataset_layout.read_image_bands`; nodata pixels become ``ignore_index`` in
    the mask and ``fill`` (one value per band, in the bands' units) in the image.

    Raises DatasetError naming the file when it no longer decodes or disagrees with the labels.
    """
    image, mask, _ = load_sample(image_path, mask_path, label_map, spec, fill)
    return image, mask


def load_sample(
    image_path: Path,
    mask_path: Path,
    label_map: LabelMap,
    spec: BandSpec | None = None,
    fill: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`load_pair`, plus the image's (H,W) bool nodata mask (None when all valid)."""
    nodata = None
    try:
        if spec is None:
            image = read_image(image_path)
        else:
            image, nodata = read_image_bands(image_path, spec)
    except (ImageError, OSError) as err:
        raise DatasetError(f"{image_path}: cannot read image: {err}") from None
    try:
        mask = label_map.to_index(read_mask(mask_path))
    except (ImageError, OSError) as err:
        raise DatasetError(f"{mask_path}: cannot read mask: {err}") from None
    except MaskValueError as err:
        raise DatasetError(f"{mask_path}: {err}") from None
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    if nodata is not None:
        mask = np.where(nodata, np.uint8(label_map.ignore_index), mask)
        if fill is not None:
            image = image.copy()
            image[nodata] = np.asarray(fill).astype(image.dtype)
    return image, mask, nodata


# --- augmentations -----------------------------------------------------------------------------


def build_train_transform(
    aug: AugmentConfig,
    image_size: int,
    ignore_index: int,
    *,
    num_classes: int | None = None,
    focus_ids: Sequence[int] = (),
) -> A.Compose:
    """Albumentations pipeline for training; image and mask are transformed together.

    Masks are always resampled with nearest-neighbour (a blended class id is a wrong class id),
    and every area that a transform invents (padding, rotated-in corners) is ``ignore_index`` in
    the mask so the loss does not learn from it. Validation and test never see this pipeline.
    """
    nearest = cv2.INTER_NEAREST
    steps = crop_steps(aug, image_size, ignore_index, num_classes=num_classes, focus_ids=focus_ids)
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        steps.append(A.VerticalFlip(p=aug.vflip))
    if aug.rotate90 > 0:
        steps.append(A.RandomRotate90(p=aug.rotate90))
    if aug.affine > 0:
        steps.append(
            A.Affine(
                scale=aug.affine_scale,
                translate_percent=(-aug.affine_translate, aug.affine_translate),
                rotate=(-aug.affine_rotate, aug.affine_rotate),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=nearest,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
                p=aug.affine,
            )
        )
    if aug.color_jitter > 0:
        steps.append(
            A.ColorJitter(
                brightness=aug.brightness,
                contrast=aug.contrast,
                saturation=aug.saturation,
                hue=aug.hue,
                p=aug.color_jitter,
            )
        )
    return A.Compose(steps, mask_interpolation=nearest)


def crop_steps(
    aug: AugmentConfig,
    image_size: int,
    ignore_index: int,
    *,
    num_classes: int | None = None,
    focus_ids: Sequence[int] = (),
) -> list[A.BasicTransform | A.BaseCompose]:
    """The crop that starts the training pipeline: ``aug.crop`` (zoomed or at native
    resolution), or with probability ``aug.focus_crop`` one centred on a focus-class pixel.
    Padding is ``ignore_index`` in the mask."""

    def pad() -> A.PadIfNeeded:
        return A.PadIfNeeded(
            min_height=image_size,
            min_width=image_size,
            position="random",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        )

    crop: A.BasicTransform | A.BaseCompose
    if aug.crop == "random_resized":
        crop = A.RandomResizedCrop(
            size=(image_size, image_size),
            scale=aug.crop_scale,
            ratio=aug.crop_ratio,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=1.0,
        )
    else:
        crop = A.Sequential([pad(), A.RandomCrop(height=image_size, width=image_size)], p=1.0)
    if aug.focus_crop <= 0 or not focus_ids:
        return [crop]
    if num_classes is None:
        raise ValueError("focus crops need num_classes")
    # CropNonEmptyMaskIfExists centres on a mask pixel whose value is not ignored; every
    # value but the focus classes is ignored, so it centres on a focus-class pixel.
    others = [i for i in range(num_classes) if i not in focus_ids] + [ignore_index]
    focus = A.Sequential(
        [
            pad(),
            A.CropNonEmptyMaskIfExists(height=image_size, width=image_size, ignore_values=others),
        ],
        p=aug.focus_crop,
    )
    crop.p = 1.0 - aug.focus_crop
    # OneOf picks one of them with probability proportional to its p.
    return [A.OneOf([focus, crop], p=1.0)] if aug.focus_crop < 1 else [focus]


# --- dataset, sampler, loaders -----------------------------------------------------------------


class SegmentationDataset(Dataset):
    """(image, mask) pairs of a folder dataset, optionally augmented.

    ``dataset[i]`` or ``dataset[(i, seed)]`` -> (image (H,W,B), mask (H,W) uint8 ids); ``spec``
    and ``fill`` as in :func:`load_pair` (without ``spec``: (H,W,3) uint8 RGB).
    With a seed the augmentation is re-seeded for that one sample, so what a sample looks like
    depends on (run seed, epoch, position) only: not on the number of workers, nor on whether
    the run was interrupted and resumed.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        label_map: LabelMap,
        transform: A.Compose | None = None,
        *,
        cache: bool = False,
        spec: BandSpec | None = None,
        fill: Sequence[float] | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.label_map = label_map
        self.transform = transform
        self.spec = spec
        self.fill = fill
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        if cache:
            self._cache = [load_pair(i, m, label_map, spec, fill) for i, m in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded, unaugmented pair ``index``."""
        if self._cache is not None:
            return self._cache[index]
        return load_pair(*self.pairs[index], self.label_map, self.spec, self.fill)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return image, mask

    def class_presence(self, min_pixels: int = 1) -> np.ndarray:
        """(N, C) bool: which classes each (unaugmented) mask holds at least ``min_pixels`` of."""
        c = self.label_map.num_classes
        present = np.zeros((len(self), c), dtype=bool)
        for i in range(len(self)):
            if self._cache is not None:
                mask = self._cache[i][1]
            else:
                _, mask_path = self.pairs[i]
                try:
                    mask = self.label_map.to_index(read_mask(mask_path))
                except (ImageError, OSError, MaskValueError) as err:
                    raise DatasetError(f"{mask_path}: {err}") from None
            present[i] = np.bincount(mask.ravel(), minlength=256)[:c] >= min_pixels
        return present


def sampling_weights(
    presence: np.ndarray, factors: Mapping[str, float], names: Sequence[str]
) -> torch.Tensor | None:
    """Per-sample weight: the largest factor among the classes a sample contains (1.0 if none).

    presence (N,C) bool. ``{"lake": 8}`` makes a tile with any lake pixel 8x as likely to be
    drawn as one without. Returns None when no factor is set (plain shuffling).
    """
    if not factors:
        return None
    per_class = np.array([float(factors.get(n, 1.0)) for n in names])
    weights = np.where(presence, per_class[None, :], 1.0).max(axis=1)
    if not np.any(weights > 0):
        raise DatasetError("data.oversample gives every training sample weight 0")
    return torch.as_tensor(weights, dtype=torch.float64)


class TrainSampler(DistributedSampler):
    """Epoch order for training: shuffled or weighted, split across ranks, seeded per epoch.

    Yields ``(index, augmentation_seed)``. With ``weights`` the indices are drawn with
    replacement in proportion to the weights (oversampling); otherwise a permutation. The order
    depends only on (seed, epoch), so every rank agrees on it and a resumed run replays it;
    :meth:`set_start` skips the samples a rank already consumed in an interrupted epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = weights
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.weights is None:
            order = torch.randperm(n, generator=g)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        seeds = torch.randint(0, _SEED_LIMIT, (n,), generator=g)
        # Pad by wrapping around so every rank gets the same number of samples.
        reps = math.ceil(self.total_size / n)
        order = order.repeat(reps)[: self.total_size]
        seeds = seeds.repeat(reps)[: self.total_size]
        mine = range(self.rank, self.total_size, self.num_replicas)
        for position in list(mine)[self.start :]:
            yield int(order[position]), int(seeds[position])

    def __len__(self) -> int:
        return self.num_samples - self.start


def collate(samples: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[Any, Any]:
    """Stack (H,W,B) images and (H,W) masks into (N,B,H,W) channels-last (the images' dtype)
    + (N,H,W) uint8.

    Images of different sizes (possible in validation) come back as lists of single-image
    batches instead, each (1,B,H,W) and (1,H,W).
    """
    shapes = {img.shape for img, _ in samples}
    if len(shapes) > 1:
        return [_stack([s])[0] for s in samples], [_stack([s])[1] for s in samples]
    return _stack(samples)


def _stack(samples: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([np.ascontiguousarray(i) for i, _ in samples]))
    masks = torch.from_numpy(np.stack([np.ascontiguousarray(m) for _, m in samples]))
    # (N,H,W,B) viewed as (N,B,H,W) is exactly the channels_last layout: no copy needed.
    return images.permute(0, 3, 1, 2), masks


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker its own numpy and ``random`` streams.

    torch already seeds every worker with base_seed + worker_id; numpy and ``random`` would
    otherwise be forked copies of the parent's state, identical in every worker.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None
    sampler: TrainSampler
    train_size: int
    val_size: int


def make_loaders(
    train_set: SegmentationDataset,
    val_set: SegmentationDataset | None,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    weights: torch.Tensor | None = None,
    pin_memory: bool = False,
) -> Loaders:
    """Training loader (sampler above, full batches only) and validation loader (this rank's
    shard of the validation set, unshuffled, nothing padded so the reduced metrics count every
    pixel exactly once)."""
    sampler = TrainSampler(
        train_set, num_replicas=world_size, rank=rank, seed=seed, weights=weights
    )
    if sampler.num_samples < batch_size:
        raise DatasetError(
            f"the training split has {len(train_set)} samples ({sampler.num_samples} per process), "
            f"fewer than train.batch_size={batch_size}"
        )
    common: dict[str, Any] = {
        "num_workers": num_workers,
        "collate_fn": collate,
        "worker_init_fn": seed_worker,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }
    # drop_last: BatchNorm after DeepLabV3's image pooling sees one value per channel and
    # sample, so a last batch of one sample would fail, and a tiny one would skew the stats.
    train = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=_generator(seed),
        **common,
    )
    val = None
    val_size = 0
    if val_set is not None and len(val_set) > 0:
        shard = list(range(rank, len(val_set), world_size))
        val_size = len(val_set)
        val = DataLoader(
            torch.utils.data.Subset(val_set, shard),
            batch_size=batch_size,
            shuffle=False,
            generator=_generator(seed + 1),
            **common,
        )
    return Loaders(train, val, sampler, len(train_set), val_size)


def _generator(seed: int) -> torch.Generator:
    # Each DataLoader iterator draws its workers' base seed from this generator; without one it
    # would draw from the global RNG, so merely validating would shift dropout's random stream.
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def iterate_batches(batch: tuple[Any, Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A collated batch as (images, masks) tensor batches: itself, or its per-image parts."""
    images, masks = batch
    if isinstance(images, list):
        yield from zip(images, masks, strict=True)
    else:
        yield images, masks


def preview_rgb(image: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``(H, W, B)`` band values -> ``(H, W, 3)`` uint8 for the eye (validation overlays): the
    bands named red, green and blue, else the first three (one band: grey), each stretched
    between its 2nd and 98th percentiles."""
    words = [set(str(n).lower().split()) for n in names]
    picked = [next((i for i, w in enumerate(words) if c in w), None) for c in RGB_WORDS]
    if any(i is None for i in picked):
        picked = [0, 1, 2] if image.shape[2] >= 3 else [0, 0, 0]
    out = np.empty((*image.shape[:2], 3), dtype=np.uint8)
    for k, i in enumerate(picked):
        band = image[:, :, i].astype(np.float32)
        low, high = np.percentile(band, (2, 98))
        scaled = (band - low) / (high - low) if high > low else np.zeros_like(band)
        out[:, :, k] = np.clip(scaled * 255 + 0.5, 0, 255).astype(np.uint8)
    return out

import numpy as np
import pytest
import torch

from shared.bands import Band, BandSpec
from shared.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STATS_FILE,
    BandStatistics,
    Normalization,
    image_to_tensor,
    load_stats,
    normalization_for,
    normalize,
    save_stats,
)

# One pixel per column: black, mid grey, white.
IMAGE = np.array([[[0, 0, 0], [128, 128, 128], [255, 255, 255]]], dtype=np.uint8)


def test_normalization_defaults_and_round_trip():
    norm = Normalization()
    assert norm.mean == IMAGENET_MEAN and norm.std == IMAGENET_STD
    assert norm.to_dict() == {
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "scale": 255.0,
    }
    assert Normalization.from_dict(norm.to_dict()) == norm
    assert Normalization.from_dict({}) == norm
    custom = Normalization.from_dict({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    assert custom.mean == (0.5, 0.5, 0.5) and custom.std == (0.25, 0.25, 0.25)


@pytest.mark.parametrize(
    "data",
    [
        {"mean": [0.5, 0.5]},
        {"std": [0.1, 0.0, 0.1]},
        {"std": [0.1, -1.0, 0.1]},
        {"mean": [0.5, float("nan"), 0.5]},
        {"mean": ["a", "b", "c"]},
        {"mean": [0.5, 0.5, 0.5], "offset": 1},
        {"mean": [], "std": []},
        {"scale": 0},
        {"scale": "big"},
    ],
)
def test_normalization_rejects_bad_values(data):
    with pytest.raises(ValueError):
        Normalization.from_dict(data)


def test_image_to_tensor_is_a_view():
    image = IMAGE.copy()
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 1, 3) and tensor.dtype == torch.uint8
    assert tensor[:, 0, 1].tolist() == [128, 128, 128]
    image[0, 0, 2] = 9  # shares memory: the change shows in the tensor
    assert tensor[2, 0, 0].item() == 9


def test_image_to_tensor_copies_read_only_arrays():
    image = IMAGE.copy()
    image.flags.writeable = False
    tensor = image_to_tensor(image)
    assert tensor[:, 0, 2].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "image", [np.zeros((2, 2), np.uint8), np.zeros((2, 2, 4), np.int64), np.zeros((2, 2, 3))]
)
def test_image_to_tensor_rejects_other_arrays(image):
    with pytest.raises(ValueError):
        image_to_tensor(image)


def test_normalize_matches_the_formula():
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).repeat(1, 3, 1, 1)
    out = normalize(batch, norm)
    assert out.dtype == torch.float32
    # (0 - 0.5) / s and (1 - 0.5) / s
    assert out[0, :, 0, 0].tolist() == pytest.approx([-1.0, -2.0, -0.5])
    assert out[0, :, 0, 1].tolist() == pytest.approx([1.0, 2.0, 0.5])


def test_normalize_keeps_channels_last_and_does_not_touch_input():
    batch = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    cl = batch.contiguous(memory_format=torch.channels_last)
    out = normalize(cl, Normalization())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, batch)
    torch.testing.assert_close(out, normalize(batch, Normalization()))


@pytest.mark.parametrize(
    "batch",
    [torch.zeros(1, 3, 2, 2, dtype=torch.float64), torch.zeros(1, 4, 2, 2, dtype=torch.uint8)],
)
def test_normalize_rejects_other_dtypes_and_band_counts(batch):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) of uint8, uint16, int16, float32"):
        normalize(batch, Normalization())


def test_an_image_normalises_with_the_imagenet_statistics():
    out = normalize(image_to_tensor(IMAGE).unsqueeze(0), Normalization())
    assert out.shape == (1, 3, 1, 3) and out.dtype == torch.float32
    values = torch.tensor([0.0, 128 / 255, 1.0]).view(1, 1, 3)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (values - mean) / std
    torch.testing.assert_close(out[0], expected)
    # Black in the red channel: -0.485 / 0.229
    assert out[0, 0, 0, 0].item() == pytest.approx(-2.1179, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalize_stays_on_the_device():
    batch = torch.from_numpy(IMAGE).permute(2, 0, 1).unsqueeze(0).cuda()
    out = normalize(batch, Normalization())
    assert out.device == batch.device
    on_cpu = normalize(batch.cpu(), Normalization())
    torch.testing.assert_close(out.cpu(), on_cpu)


# --------------------------------------------------------------------------- multi-band

SIXTEEN_BIT = BandSpec(tuple(Band(n, i) for i, n in enumerate(("b", "g", "r", "nir"), 1)), "uint16")


def test_multiband_uint16_normalises_in_band_units_and_zeroes_nodata():
    norm = Normalization(mean=(1000.0, 2000.0), std=(10.0, 500.0), scale=1.0)
    image = np.array([[[1010, 2500], [0, 0]]], dtype=np.uint16)  # (H=1, W=2, B=2)
    batch = image_to_tensor(image).unsqueeze(0)
    assert batch.dtype == torch.uint16 and batch.shape == (1, 2, 1, 2)
    out = normalize(batch, norm)
    assert out[0, :, 0, 0].tolist() == pytest.approx([1.0, 1.0])
    assert out[0, :, 0, 1].tolist() == pytest.approx([-100.0, -4.0])
    masked = normalize(batch, norm, nodata=torch.tensor([[[False, True]]]))
    assert masked[0, :, 0, 0].tolist() == pytest.approx([1.0, 1.0])
    assert masked[0, :, 0, 1].tolist() == [0.0, 0.0]


def test_normalize_refuses_a_nodata_mask_of_another_shape():
    with pytest.raises(ValueError, match="nodata must be"):
        normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), Normalization(), torch.zeros(2, 2))


def test_band_statistics_match_numpy_over_valid_pixels_only():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 65535, (3, 20, 30), dtype=np.uint16) for _ in range(3)]
    masks = [rng.random((20, 30)) < 0.3 for _ in range(3)]
    for image, mask in zip(images, masks, strict=True):
        image[:, mask] = 0  # fill values that would drag the mean down if counted
    stats = BandStatistics()
    for image, mask in zip(images, masks, strict=True):
        stats.update(image, mask)
    valid = np.concatenate(
        [image[:, ~mask] for image, mask in zip(images, masks, strict=True)], axis=1
    ).astype(np.float64)
    norm = stats.normalization()
    assert norm.scale == 1.0
    np.testing.assert_allclose(norm.mean, valid.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(norm.std, valid.std(axis=1), rtol=1e-10)
    np.testing.assert_array_equal(stats.count, [valid.shape[1]] * 3)
    np.testing.assert_array_equal(stats.minimum, valid.min(axis=1))


def test_band_statistics_are_exact_for_large_offsets():
    # 16-bit values near the top of the range with a small spread: sum-of-squares loses them.
    stats = BandStatistics()
    for value in (60000, 60001, 60002, 60003):
        stats.update(np.full((1, 100, 100), value, dtype=np.uint16))
    norm = stats.normalization()
    assert norm.mean[0] == pytest.approx(60001.5)
    assert norm.std[0] == pytest.approx(np.std([60000, 60001, 60002, 60003]), rel=1e-12)


def test_band_statistics_name_a_constant_band_and_refuse_no_pixels():
    stats = BandStatistics()
    data = np.stack([np.arange(12).reshape(3, 4), np.full((3, 4), 7)]).astype(np.int16)
    stats.update(data)
    with pytest.raises(ValueError, match="relief is constant"):
        stats.normalization(("red", "relief"))
    empty = BandStatistics()
    empty.update(data, np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="no valid"):
        empty.normalization()
    with pytest.raises(ValueError, match="3 bands, earlier images had 2"):
        stats.update(np.zeros((3, 3, 4), dtype=np.int16))


def test_rgb8_keeps_imagenet_and_other_bands_need_statistics():
    measured = Normalization(mean=(1.0,) * 4, std=(2.0,) * 4, scale=1.0)
    assert normalization_for(BandSpec.rgb(), measured) == Normalization()
    assert normalization_for(SIXTEEN_BIT, measured) is measured
    with pytest.raises(ValueError, match="b, g, r, nir \\(uint16\\) need per-band statistics"):
        normalization_for(SIXTEEN_BIT, None)
    with pytest.raises(ValueError, match="hold 3 bands but the model reads 4"):
        normalization_for(SIXTEEN_BIT, Normalization(mean=(0.0,) * 3, std=(1.0,) * 3))


def test_stats_file_round_trip_and_band_check(tmp_path):
    stats = BandStatistics()
    stats.update(np.arange(4 * 6, dtype=np.uint16).reshape(4, 2, 3))
    path = tmp_path / STATS_FILE
    written = save_stats(path, SIXTEEN_BIT, stats, split="TAIN_VAL_SET", files=1)
    assert load_stats(path, SIXTEEN_BIT) == written
    other = BandSpec(tuple(Band(n, i) for i, n in enumerate(("r", "g", "b", "nir"), 1)), "uint16")
    with pytest.raises(ValueError, match="measured on bands b, g, r, nir, not r, g, b, nir"):
        load_stats(path, other)
    path.write_text("{")
    with pytest.raises(ValueError, match=f"{STATS_FILE} is unreadable"):
        load_stats(path)

import numpy as np
import pytest
import torch

from shared.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalization,
    image_to_tensor,
    normalize,
    preprocess,
)

# One pixel per column: black, mid grey, white.
IMAGE = np.array([[[0, 0, 0], [128, 128, 128], [255, 255, 255]]], dtype=np.uint8)


def test_normalization_defaults_and_round_trip():
    norm = Normalization()
    assert norm.mean == IMAGENET_MEAN and norm.std == IMAGENET_STD
    assert norm.to_dict() == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
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
        {"mean": [0.5, 0.5, 0.5], "scale": 255},
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
    "image", [np.zeros((2, 2), np.uint8), np.zeros((2, 2, 4), np.uint8), np.zeros((2, 2, 3))]
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


def test_normalize_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 3, 2, 2), Normalization())


def test_preprocess_is_the_eval_transform():
    out = preprocess(IMAGE, Normalization())
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
    torch.testing.assert_close(out.cpu(), preprocess(IMAGE, Normalization()))

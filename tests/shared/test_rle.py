import numpy as np
import pytest
from pycocotools import mask as coco

from shared.rle import RLEError, decode, encode

# pycocotools' decode trips a numpy 2 deprecation inside its own code.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def reference(mask: np.ndarray) -> str:
    return coco.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def check(mask: np.ndarray) -> None:
    """Byte-for-byte equal to pycocotools, and both decoders give the mask back."""
    rle = encode(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    assert rle["counts"] == reference(mask)
    out = decode(rle)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    np.testing.assert_array_equal(out, mask.astype(np.uint8))
    if mask.size:  # pycocotools cannot decode zero-sized masks
        coco_rle = {"size": rle["size"], "counts": rle["counts"].encode()}
        np.testing.assert_array_equal(coco.decode(coco_rle), mask.astype(np.uint8))


def test_hand_checked_example():
    # Column-major: column 0 is [0, 1], column 1 is [1, 1], column 2 is [0, 0]
    # -> pixels 0 1 1 1 0 0 -> runs 1 (zeros), 3 (ones), 2 (zeros) -> "132".
    mask = np.array([[0, 1, 0], [1, 1, 0]], dtype=np.uint8)
    assert encode(mask) == {"size": [2, 3], "counts": "132"}
    assert decode({"size": [2, 3], "counts": "132"}).tolist() == mask.tolist()


def test_first_run_is_background_even_when_empty():
    # Column-major: 1 0 1 0 -> runs 0, 1, 1, 1, 1; from the 4th run on each count is stored as
    # the difference to the count two places before: 0 1 1 (1-1) (1-1) -> "01100".
    mask = np.array([[1, 1], [0, 0]], dtype=bool)
    assert encode(mask)["counts"] == reference(mask) == "01100"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(8, 8), (31, 17), (17, 31), (64, 65), (101, 3)])
@pytest.mark.parametrize("density", [0.01, 0.5, 0.97])
def test_random_masks_match_pycocotools(seed, shape, density):
    rng = np.random.default_rng(seed)
    check(rng.random(shape) < density)


@pytest.mark.parametrize("seed", [0, 1])
def test_long_runs_use_multi_group_and_negative_deltas(seed):
    # Blocks of very different sizes give large counts and negative differences.
    rng = np.random.default_rng(seed)
    mask = np.zeros((300, 200), dtype=bool)
    for _ in range(30):
        y, x = rng.integers(0, 300), rng.integers(0, 200)
        mask[y : y + rng.integers(1, 120), x : x + rng.integers(1, 80)] ^= True
    check(mask)
    assert any(ord(ch) - 48 >= 0x20 for ch in encode(mask)["counts"])


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((5, 7), dtype=bool),  # empty
        np.ones((5, 7), dtype=bool),  # full
        np.ones((1, 1), dtype=bool),  # single pixel, set
        np.zeros((1, 1), dtype=bool),  # single pixel, unset
        np.eye(1, 9, 4, dtype=bool),  # 1xN
        np.eye(9, 1, -4, dtype=bool),  # Nx1
        np.ones((1, 13), dtype=bool),
        np.ones((13, 1), dtype=bool),
        np.pad(np.ones((1, 1), dtype=bool), ((3, 2), (5, 4))),  # one pixel inside odd shape
        np.ones((1000, 1000), dtype=bool),  # counts past one 5-bit group
    ],
    ids=["empty", "full", "px1", "px0", "1xN", "Nx1", "1xN-full", "Nx1-full", "odd", "big"],
)
def test_edge_cases_match_pycocotools(mask):
    check(mask)


def test_known_strings():
    # 35 = 0b1_00011: low group 3 plus the "more" bit 0x20 -> chr(48 + 35) = "S", then 1 -> "1".
    assert encode(np.zeros((5, 7), dtype=bool))["counts"] == "S1"
    assert encode(np.ones((1, 1), dtype=bool))["counts"] == "01"


def test_zero_sized_mask():
    rle = encode(np.zeros((0, 4), dtype=bool))
    assert rle == {"size": [0, 4], "counts": "0"}
    assert decode(rle).shape == (0, 4)


def test_accepts_zero_one_integers_and_rejects_other_values():
    assert encode(np.array([[0, 1]], dtype=np.int64)) == encode(np.array([[False, True]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        encode(np.array([[0, 2]]))
    with pytest.raises(ValueError, match="shape"):
        encode(np.zeros((2, 2, 1), dtype=bool))


def test_decode_accepts_bytes_and_uncompressed_counts():
    mask = np.array([[0, 1, 0], [1, 1, 0]], dtype=np.uint8)
    assert decode({"size": [2, 3], "counts": b"132"}).tolist() == mask.tolist()
    assert decode({"size": [2, 3], "counts": [1, 3, 2]}).tolist() == mask.tolist()


@pytest.mark.parametrize(
    "rle",
    [
        {"size": [2, 3], "counts": "13"},  # covers 4 pixels, not 6
        {"size": [2, 3], "counts": "1322"},  # too many
        {"size": [2, 3], "counts": "1 2"},  # bad character
        {"size": [2, 3], "counts": "1P"},  # ends inside a value (0x20 set)
        {"size": [2, 3], "counts": [1, -3, 8]},
        {"size": [2], "counts": "132"},
        {"size": [2, -3], "counts": "132"},
        {"counts": "132"},
        {"size": [2, 3], "counts": 132},
        "132",
    ],
)
def test_decode_rejects_malformed(rle):
    with pytest.raises(RLEError):
        decode(rle)

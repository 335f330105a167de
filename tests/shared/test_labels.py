import json

import numpy as np
import pytest
from PIL import Image

from shared.labels import (
    DEFAULT_LABEL_MAPPING,
    LabelClass,
    LabelMap,
    LabelMapError,
    MaskValueError,
    overlay,
)

OCEAN, LAND, LAKE = (24, 64, 160), (76, 153, 0), (0, 220, 255)


def mapping(**overrides):
    data = {
        "ignore_index": 255,
        "classes": [
            {"id": 0, "name": "ocean", "color": list(OCEAN)},
            {"id": 1, "name": "land", "color": list(LAND)},
            {"id": 2, "name": "lake", "color": list(LAKE)},
        ],
    }
    data.update(overrides)
    return data


@pytest.fixture
def lm() -> LabelMap:
    return LabelMap.from_dict(mapping())


def test_bundled_mapping_loads():
    lm = LabelMap.load(DEFAULT_LABEL_MAPPING)
    assert lm.names == ["ocean", "land", "lake"]
    assert lm.ignore_index == 255
    assert lm.colors.tolist() == [list(OCEAN), list(LAND), list(LAKE)]
    assert lm.colors.dtype == np.uint8


def test_properties_and_round_trip(lm):
    assert lm.num_classes == 3
    assert lm.classes[1] == LabelClass(id=1, name="land", color=LAND)
    assert LabelMap.from_dict(lm.to_dict()) == lm
    assert json.loads(json.dumps(lm.to_dict())) == mapping()


def test_classes_are_ordered_by_id():
    data = mapping()
    data["classes"].reverse()
    assert LabelMap.from_dict(data).names == ["ocean", "land", "lake"]


def test_ignore_index_defaults_to_255():
    data = mapping()
    del data["ignore_index"]
    assert LabelMap.from_dict(data).ignore_index == 255


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d["classes"][2].update(id=5), "ids must be 0..2"),
        (lambda d: d["classes"][1].update(name="ocean"), "duplicate class names ['ocean']"),
        (lambda d: d["classes"][1].update(color=[1, 2]), "color must be [r, g, b]"),
        (lambda d: d["classes"][1].update(color=[1, 2, 300]), "color must be [r, g, b]"),
        (lambda d: d["classes"][1].update(color=list(OCEAN)), "share colours"),
        (lambda d: d["classes"][0].pop("name"), "missing ['name']"),
        (lambda d: d["classes"][0].update(id=True), "id must be an integer"),
        (lambda d: d.update(ignore_index=1), "ignore_index 1 is also a class id"),
        (lambda d: d.update(ignore_index=256), "ignore_index must be an integer in 0..255"),
        (lambda d: d.update(classes=[]), "non-empty list"),
        (lambda d: d.update(extra=1), "unknown keys ['extra']"),
    ],
)
def test_invalid_mappings_name_the_problem_and_source(change, needle):
    data = mapping()
    change(data)
    with pytest.raises(LabelMapError) as info:
        LabelMap.from_dict(data, source="my_labels.json")
    assert needle in str(info.value)
    assert "my_labels.json" in str(info.value)


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(LabelMapError, match="missing.json"):
        LabelMap.load(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LabelMapError, match="broken.json.*not valid JSON"):
        LabelMap.load(broken)


def test_direct_construction_is_validated():
    with pytest.raises(LabelMapError):
        LabelMap(classes=(LabelClass(1, "land", LAND),))


def test_to_index_from_index_mask(lm):
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    out = lm.to_index(mask)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1], [2, 255]]
    # Wider integer types (16-bit PNGs, int64 arrays) and (H, W, 1) work too.
    assert lm.to_index(mask.astype(np.uint16)).tolist() == [[0, 1], [2, 255]]
    assert lm.to_index(mask.astype(np.int64)[..., None]).tolist() == [[0, 1], [2, 255]]


def test_to_index_names_unknown_values(lm):
    mask = np.array([[0, 7], [3, 7]], dtype=np.uint8)
    with pytest.raises(MaskValueError) as info:
        lm.to_index(mask)
    assert info.value.values == [3, 7]
    assert "[3, 7]" in str(info.value)


def test_to_index_names_values_outside_uint8(lm):
    with pytest.raises(MaskValueError) as info:
        lm.to_index(np.array([[0, -1], [1000, 1]], dtype=np.int32))
    assert info.value.values == [-1, 1000]


def test_to_index_from_colour_mask(lm):
    colour = np.array([[OCEAN, LAND], [LAKE, (0, 0, 0)]], dtype=np.uint8)
    # Black is unlabelled (the inverse of to_color).
    assert lm.to_index(colour).tolist() == [[0, 1], [2, 255]]


def test_to_index_names_unknown_colours(lm):
    colour = np.array([[OCEAN, (1, 2, 3)], [(1, 2, 3), (9, 9, 9)]], dtype=np.uint8)
    with pytest.raises(MaskValueError) as info:
        lm.to_index(colour)
    assert info.value.values == [[1, 2, 3], [9, 9, 9]]
    assert "[1, 2, 3]" in str(info.value)


def test_black_is_a_class_when_a_class_owns_it():
    data = mapping()
    data["classes"][0]["color"] = [0, 0, 0]
    lm = LabelMap.from_dict(data)
    assert lm.to_index(np.zeros((1, 2, 3), dtype=np.uint8)).tolist() == [[0, 0]]


def test_to_index_rejects_other_shapes(lm):
    with pytest.raises(MaskValueError, match="shape"):
        lm.to_index(np.zeros((2, 2, 4), dtype=np.uint8))


def test_to_color(lm):
    out = lm.to_color(np.array([[0, 1], [2, 255]]))
    assert out.dtype == np.uint8
    assert out.tolist() == [[list(OCEAN), list(LAND)], [list(LAKE), [0, 0, 0]]]
    with pytest.raises(MaskValueError):
        lm.to_color(np.array([[4]]))


def test_palette_puts_class_colours_at_their_ids(lm):
    palette = lm.palette()
    assert len(palette) == 768
    assert palette[:9] == [*OCEAN, *LAND, *LAKE]
    assert set(palette[9:]) == {0}
    im = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), mode="L")
    im.putpalette(palette)
    assert np.asarray(im.convert("RGB")).tolist() == [[list(OCEAN), list(LAND), list(LAKE)]]


def test_overlay_blends_and_leaves_ignored_pixels(lm):
    image = np.full((1, 3, 3), 100, dtype=np.uint8)
    index = np.array([[0, 1, 255]])
    out = overlay(image, index, lm, alpha=0.5)
    assert out.dtype == np.uint8
    # (100 + 24) / 2 = 62, (100 + 64) / 2 = 82, (100 + 160) / 2 = 130
    assert out[0, 0].tolist() == [62, 82, 130]
    assert out[0, 1].tolist() == [88, 126, 50]
    assert out[0, 2].tolist() == [100, 100, 100]
    assert overlay(image, index, lm, alpha=0.0)[0, :2].tolist() == [[100] * 3] * 2
    assert overlay(image, index, lm, alpha=1.0)[0, 1].tolist() == list(LAND)


def test_overlay_checks_shapes(lm):
    with pytest.raises(ValueError, match="does not match"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2), np.uint8), lm)

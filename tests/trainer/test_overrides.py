from __future__ import annotations

from pathlib import Path

import pytest

from trainer.overrides import parse_override, read_config_file, read_yaml, set_dotted


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: [1,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.yaml: line 4 cannot read"):
        read_yaml(path)


def test_an_empty_file_is_an_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n", encoding="utf-8")
    assert read_yaml(path) == {}


def test_an_override_below_a_value_names_the_value() -> None:
    data = {"train": {"lr": 0.1}}
    with pytest.raises(ValueError, match=r"override train\.lr\.x: train\.lr is not a section"):
        set_dotted(data, "train.lr.x", 1)


def test_overrides_create_sections_and_fill_null_ones() -> None:
    data: dict = {"train": None}
    set_dotted(data, "train.class_weights.lake", 5)
    set_dotted(data, "data.root", "x")
    assert data == {"train": {"class_weights": {"lake": 5}}, "data": {"root": "x"}}


def test_override_values_that_are_not_yaml_stay_text() -> None:
    assert parse_override("run_name=") == ("run_name", "")
    assert parse_override("data.root=[unclosed") == ("data.root", "[unclosed")
    with pytest.raises(ValueError, match="expected key.path=value"):
        parse_override("train.lr")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_a_file_changes_its_base_key_by_key(tmp_path: Path) -> None:
    write(
        tmp_path / "recipes" / "base.yaml",
        "run_name: quick\n"
        "data: {root: data/rgb, image_size: 192, bands: [1, 2, 3]}\n"
        "train: {lr: 0.003, class_weights: {lake: 2.0}}\n",
    )
    # The base path is relative to the file that names it, not to the working directory.
    child = write(
        tmp_path / "recipes" / "child.yaml",
        "base: base.yaml\nrun_name: relief\ndata: {root: data/relief, bands: null}\n"
        "train: {class_weights: {land: 0.5}}\n",
    )
    assert read_config_file(child) == {
        "run_name": "relief",
        "data": {"root": "data/relief", "image_size": 192, "bands": None},
        "train": {"lr": 0.003, "class_weights": {"lake": 2.0, "land": 0.5}},
    }


def test_bases_chain_and_lists_replace(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "augment: {crop_scale: [0.2, 0.4], hflip: 0.5}\n")
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\naugment: {crop_scale: [0.5, 1.0]}\n")
    c = write(tmp_path / "sub" / "c.yaml", "base: b.yaml\naugment: {hflip: 0.0}\n")
    assert read_config_file(c) == {"augment": {"crop_scale": [0.5, 1.0], "hflip": 0.0}}


def test_a_missing_base_names_both_files(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "base: nowhere.yaml\n")
    with pytest.raises(
        ValueError, match=r"child\.yaml: base nowhere\.yaml: .*nowhere\.yaml: config file not found"
    ):
        read_config_file(child)


def test_a_base_loop_is_named(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    b = write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(
        ValueError, match=r"base files form a loop: .*b\.yaml -> .*a\.yaml -> .*b\.yaml"
    ):
        read_config_file(b)


@pytest.mark.parametrize("value", ["[a.yaml]", "''", "3"])
def test_a_base_that_is_not_a_path_is_named(tmp_path: Path, value: str) -> None:
    child = write(tmp_path / "child.yaml", f"base: {value}\n")
    with pytest.raises(ValueError, match=r"child\.yaml: base must be the path of a config file"):
        read_config_file(child)

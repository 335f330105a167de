from __future__ import annotations

from pathlib import Path

import pytest

from trainer.overrides import parse_override, read_yaml, set_dotted


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

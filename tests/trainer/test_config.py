from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import (
    Config,
    ConfigError,
    check_class_names,
    dump_yaml,
    load_config,
    parse_override,
)
from trainer.fit import main

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path / "c.yaml",
        "train:\n  lr: 0.001\n  epochs: 3\ndata:\n  image_size: 256\n",
    )
    cfg = load_config(cfg_file, ["train.epochs=7", "model.aux_loss=true"])
    assert cfg.train.lr == 0.001  # from the file
    assert cfg.train.epochs == 7  # the override wins over the file
    assert cfg.data.image_size == 256
    assert cfg.model.aux_loss is True
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


def test_override_values_are_parsed_as_yaml() -> None:
    assert parse_override("train.max_steps=null") == ("train.max_steps", None)
    assert parse_override("augment.crop_scale=[0.5, 1.0]") == ("augment.crop_scale", [0.5, 1.0])
    cfg = load_config(None, ["train.lr=3e-4", "augment.crop_scale=[0.5, 1.0]"])
    # YAML 1.1 reads 3e-4 as a string; float keys accept it anyway.
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.augment.crop_scale == (0.5, 1.0)


def test_dict_keys_can_be_set_one_by_one() -> None:
    cfg = load_config(None, ["train.class_weights.lake=5", "data.oversample.lake=8"])
    assert cfg.train.class_weights == {"lake": 5.0}
    assert cfg.data.oversample == {"lake": 8.0}


@pytest.mark.parametrize(
    ("text", "overrides", "named"),
    [
        ("train:\n  lrr: 0.1\n", [], "train.lrr"),
        ("", ["train.lrr=0.1"], "train.lrr"),
        ("trian:\n  lr: 0.1\n", [], "trian"),
        ("", ["train.lr=fast"], "train.lr"),
        ("", ["train.epochs=2.5"], "train.epochs"),
        ("", ["train.epochs=true"], "train.epochs"),
        ("", ["model.aux_loss=maybe"], "model.aux_loss"),
        ("", ["train.loss=focal"], "train.loss"),
        ("", ["train.epochs=null"], "train.epochs"),
        ("", ["augment.crop_scale=[0.5]"], "augment.crop_scale"),
        ("", ["data.oversample.lake=lots"], "data.oversample.lake"),
        ("", ["train.lr.x=1"], "train.lr"),
        ("train: 3\n", [], "train"),
        ("", ["data.val_fraction=1.0"], "data.val_fraction"),
        ("", ["train.batch_size=1"], "train.batch_size"),
        ("", ["eval.overlap=512"], "eval.overlap"),
        ("", ["model.bn_momentum=0"], "model.bn_momentum"),
        ("", ["augment.focus_crop=1.5"], "augment.focus_crop"),
        ("", ["train.best_by=final"], "train.best_by"),
        ("", ["train.best_by=last_epoch", "train.patience=3"], "train.patience"),
        ("", ["train.loss=dice+ce", "train.lovasz_per_image=true"], "train.lovasz_per_image"),
    ],
)
def test_bad_keys_and_values_name_the_key(
    tmp_path: Path, text: str, overrides: list[str], named: str
) -> None:
    cfg_file = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(cfg_file, overrides)


def test_typo_suggests_the_right_key() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=0.1"])


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path / "bad.yaml", "train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    top = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_nullable_keys_take_null() -> None:
    cfg = load_config(None, ["train.max_steps=null", "train.grad_clip=null"])
    assert cfg.train.max_steps is None and cfg.train.grad_clip is None


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=0.002", "augment.crop=random", "train.class_weights.lake=3"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_class_names_in_config_must_exist(label_map) -> None:
    cfg = load_config(None, ["train.class_weights.lakes=3"])
    with pytest.raises(ConfigError, match=r"train\.class_weights\.lakes.*lake"):
        check_class_names(cfg, label_map.names)
    cfg = load_config(None, ["augment.focus_classes=[lake, pond]"])
    with pytest.raises(ConfigError, match=r"augment\.focus_classes\[1\].*pond"):
        check_class_names(cfg, label_map.names)
    check_class_names(load_config(None, ["data.oversample.lake=2"]), label_map.names)


@pytest.mark.parametrize("name", ["config.yaml", "configs/quickstart.yaml"])
def test_shipped_recipes_load(name: str) -> None:
    cfg = load_config(REPO / "trainer" / name)
    assert cfg.data.root == "data/bluemarble"
    assert cfg.eval.enabled


def test_the_relief_recipe_is_the_quick_recipe_but_for_its_data() -> None:
    rgb = load_config(REPO / "trainer" / "configs" / "quickstart.yaml").model_dump()
    relief = load_config(REPO / "trainer" / "configs" / "quickstart-relief.yaml").model_dump()
    assert relief["run_name"] == "quickstart-relief"
    assert relief["data"]["root"] == "data/bluemarble-relief"
    assert relief["data"]["bands"] is None  # every band: red, green, blue, relief
    for key in ("run_name", "data"):
        rgb.pop(key), relief.pop(key)
    assert relief == rgb


def test_a_base_file_that_fails_is_a_config_error_naming_both(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "train:\n  lr: fast\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ndata:\n  root: x\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: train\.lr: .*'fast'"):
        load_config(child)
    write(tmp_path / "child.yaml", "base: base.yml\n")
    with pytest.raises(
        ConfigError, match=r"child\.yaml: base base\.yml: .*base\.yml: config file not"
    ):
        load_config(child)


def test_required_key_names_exist() -> None:
    cfg = load_config(
        None,
        [
            "data.root=x",
            "data.image_size=64",
            "model.backbone=mobilenet_v3_large",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=2",
            "train.lr=0.1",
            "train.max_steps=5",
            "train.seed=1",
            "out_dir=o",
        ],
    )
    assert (cfg.data.root, cfg.out_dir, cfg.train.max_steps, cfg.train.seed) == ("x", "o", 5, 1)


def test_cli_typo_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    rc = main([f"out_dir={out}", "data.root=/nonexistent", "train.epochz=2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.epochz" in err and "train.epochs" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was created


def test_eval_tile_is_refused_as_the_predictor_would() -> None:
    # The test evaluation runs after training; its tile is checked before any work.
    with pytest.raises(ConfigError, match=r"eval\.tile must be a positive multiple of 32"):
        load_config(None, ["eval.tile=100"])
    assert load_config(None, ["eval.tile=96", "eval.overlap=95"]).eval.tile == 96


def test_an_old_backbone_id_is_read_as_its_new_name() -> None:
    cfg = load_config(None, ["model.backbone=mobilenet_v3_large_lean1"])
    assert cfg.model.backbone == "mobilenet_v3_large_deeplabv3plus_s1_aspp160"
    quick = load_config(REPO / "trainer" / "configs" / "quickstart.yaml")
    assert quick.model.backbone == "mobilenet_v3_large_deeplabv3plus_s1_aspp160"

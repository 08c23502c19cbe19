"""Config: presets, merging order, type checks, helpful errors."""

from __future__ import annotations

import pytest
import yaml

from stego.config import StegoConfig, list_presets, load_config, parse_override
from stego.errors import StegoError

PRESETS = [
    "camvid",
    "camvid-labelfree",
    "cityscapes27",
    "cocostuff27",
    "cocostuff27-vits8",
    "potsdam3",
]


def test_all_presets_shipped() -> None:
    assert list_presets() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name: str) -> None:
    config = load_config(name)
    assert config.data.dataset
    assert config.train.steps > 0


def test_preset_values_match_released_checkpoints() -> None:
    coco = load_config("cocostuff27")
    assert (coco.model.backbone, coco.train.steps, coco.data.batch_size) == ("dino-vitb8", 7000, 32)
    assert (coco.data.crop_type, coco.model.code_dim, coco.loss.pointwise) == ("five", 90, True)
    assert coco.loss.neg_inter_weight == 0.1538476246415498
    assert (coco.loss.neg_inter_shift, coco.loss.pos_inter_shift, coco.loss.pos_intra_shift) == (
        1.0,
        0.2,
        0.12,
    )
    city = load_config("cityscapes27")
    assert city.loss.pointwise is False and city.model.code_dim == 100
    assert city.loss.pos_intra_shift == 0.45828472207
    potsdam = load_config("potsdam3")
    assert (potsdam.data.crop_type, potsdam.loss.neg_inter_shift) == ("none", 0.76)
    camvid = load_config("camvid")
    assert (camvid.model.backbone, camvid.model.layer) == ("imgfocus-saliency-vits14", 8)
    assert camvid.data.resolution % 14 == 0


def test_labelfree_camvid_preset_differs_only_in_the_shifts() -> None:
    from dataclasses import asdict

    from stego.losses import SHIFT_KEYS

    tuned, free = asdict(load_config("camvid")), asdict(load_config("camvid-labelfree"))
    for key in SHIFT_KEYS.values():
        assert isinstance(tuned["loss"][key], float) and free["loss"][key] == "auto"
        del tuned["loss"][key], free["loss"][key]
    assert tuned == free


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(StegoError, match="valid presets: camvid, camvid-labelfree, cityscapes27"):
        load_config("coco")


def test_unknown_key_lists_valid_keys_of_section() -> None:
    with pytest.raises(
        StegoError, match=r"unknown key 'train\.stepz'.*valid keys of 'train': steps, lr"
    ):
        load_config(overrides=["train.stepz=3"])


def test_unknown_section() -> None:
    with pytest.raises(StegoError, match="valid sections: data, model, loss, train"):
        load_config(overrides=["optim.lr=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=ten", "train.steps .* must be int, got 'ten'"),
        ("train.steps=1.5", "must be int"),
        ("loss.pointwise=3", "must be bool"),
        ("model.head=mlp", "must be 'nonlinear' | 'linear' | 'none'"),
        ("train.use_feature_cache=maybe", "must be bool | 'auto'"),
        ("data.batch_size=true", "must be int"),
    ],
)
def test_wrong_types_name_key_type_and_value(override: str, expected: str) -> None:
    with pytest.raises(StegoError, match=expected):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=-1",
        "train.knn_k=0",
        "data.batch_size=0",
        "train.lr=0",
        "train.probe_lr=-1e-3",
        "model.dropout=1.0",
        "train.num_neighbors=30",
    ],
)
def test_impossible_values_rejected(override: str) -> None:
    with pytest.raises(StegoError, match=override.split("=")[0]):
        load_config(overrides=[override])


def test_batch_must_split_over_devices() -> None:
    with pytest.raises(StegoError, match="divisible"):
        load_config(overrides=["data.batch_size=5", "train.devices=2"])


def test_overrides_apply_and_parse_yaml() -> None:
    config = load_config(
        "potsdam3",
        overrides=[
            "train.steps=12",
            "train.lr=5e-4",
            "model.layer=null",
            "model.layer=3",
            "train.use_feature_cache=true",
            "data.data_root=/data",
        ],
    )
    assert config.train.steps == 12
    assert config.train.lr == 5e-4 and isinstance(config.train.lr, float)  # "5e-4" is a YAML string
    assert config.model.layer == 3
    assert config.train.use_feature_cache is True
    assert config.data.data_root == "/data"
    assert config.loss.neg_inter_shift == 0.76  # preset kept


def test_int_accepted_for_float() -> None:
    assert load_config(overrides=["loss.neg_inter_shift=1"]).loss.neg_inter_shift == 1.0


def test_malformed_override() -> None:
    with pytest.raises(StegoError, match="section.key=value"):
        load_config(overrides=["steps"])
    assert parse_override("a.b=") == ("a", "b", None)


def test_order_defaults_preset_file_overrides(tmp_path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text(
        yaml.safe_dump({"train": {"steps": 50, "seed": 3}, "loss": {"pointwise": False}})
    )
    config = load_config("cocostuff27", path, ["train.steps=60"])
    assert config.train.steps == 60  # override beats file
    assert config.train.seed == 3  # file beats preset/defaults
    assert config.loss.pointwise is False  # file beats preset
    assert config.model.code_dim == 90  # preset beats defaults
    assert config.train.lr == 5e-4  # default


def test_bad_file_errors(tmp_path) -> None:
    with pytest.raises(StegoError, match="not found"):
        load_config(file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(StegoError, match="not valid YAML"):
        load_config(file=bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  stepz: 3\n")
    with pytest.raises(StegoError, match=f"config file {wrong}"):
        load_config(file=wrong)


def test_dict_and_yaml_round_trip(tmp_path) -> None:
    config = load_config(
        "cityscapes27", overrides=["data.data_root=/x", "train.use_feature_cache=false"]
    )
    again = StegoConfig.from_dict(config.to_dict())
    assert again == config
    config.save(tmp_path / "config.yaml")
    loaded = load_config(file=tmp_path / "config.yaml")
    assert loaded == config

"""Bad configs and flags through the command line: exit status 2, one line on stderr, no traceback.

Every case stops before any heavy work (the random ``tiny-vit`` backbone is named wherever a
backbone would otherwise be downloaded) and leaves no half-made run folder behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stego.cli import main


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert err.count("\n") == 0, err
    assert err.startswith(f"stego {argv[0]}: error: "), err
    return err


@pytest.fixture
def camvid_root(tmp_path: Path, helpers) -> Path:
    root = tmp_path / "camvid"
    helpers.write_folder(root / "images" / "train", 2, size=(16, 16))
    return root


def _train(tmp_path: Path, data_root: Path | str, *extra: str) -> list[str]:
    return ["train", "--out", str(tmp_path / "run"), "--data-root", str(data_root),
            "--backbone", "tiny-vit", "--dataset", "camvid", *extra]  # fmt: skip


CASES = {
    "unknown key": (["--set", "loss.nope=1"], r"unknown key 'loss\.nope'.*valid keys"),
    "unknown section": (["--set", "optim.lr=1"], r"unknown section 'optim'"),
    "malformed override": (["--set", "train.steps"], r"section\.key=value"),
    "wrong type": (["--set", "train.steps=abc"], r"train\.steps.*must be int.*'abc'"),
    "bool for int": (["--set", "train.steps=true"], r"train\.steps.*must be int"),
    "negative steps": (["--steps", "-5"], r"train\.steps must be > 0, got -5"),
    "zero steps": (["--set", "train.steps=0"], r"train\.steps must be > 0"),
    "K = 0": (["--set", "model.n_clusters=0"], r"model\.n_clusters must be > 0"),
    "negative K": (["--set", "model.n_clusters=-2"], r"model\.n_clusters must be > 0"),
    "bad literal": (["--set", "data.crop_type=six"], r"data\.crop_type.*'none' \| 'five'"),
    "neighbours >= k": (["--set", "train.num_neighbors=30"], r"num_neighbors.*smaller"),
    "unknown preset": (["--preset", "nope"], r"unknown preset 'nope'; valid presets: .*camvid"),
    "unknown backbone": (["--backbone", "vit-huge-9"], r"unknown backbone 'vit-huge-9'; valid"),
    "unknown dataset": (["--dataset", "imagenet"], r"unknown dataset 'imagenet'; choose one of"),
    "batch not divisible": (["--devices", "3"], r"divisible"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_flag_errors(case, tmp_path, camvid_root, capsys) -> None:
    extra, pattern = CASES[case]
    err = _one_line_error(capsys, _train(tmp_path, camvid_root, *extra))
    import re

    assert re.search(pattern, err), err
    run = tmp_path / "run"
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_missing_config_file(tmp_path, camvid_root, capsys) -> None:
    argv = _train(tmp_path, camvid_root, "--config", str(tmp_path / "x.yaml"))
    err = _one_line_error(capsys, argv)
    assert "x.yaml" in err and "not found" in err


def test_invalid_yaml_config_file(tmp_path, camvid_root, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1, 2\n")
    err = _one_line_error(capsys, _train(tmp_path, camvid_root, "--config", str(bad)))
    assert "bad.yaml" in err and "YAML" in err


def test_train_missing_data_root(tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-root"
    err = _one_line_error(capsys, _train(tmp_path, missing))
    assert str(missing) in err and "does not exist" in err


def test_train_no_data_root_at_all(tmp_path, capsys) -> None:
    argv = ["train", "--out", str(tmp_path / "run"), "--backbone", "tiny-vit",
            "--dataset", "camvid"]  # fmt: skip
    err = _one_line_error(capsys, argv)
    assert "data_root" in err and "--data-root" in err


def test_features_missing_data_root(tmp_path, capsys) -> None:
    missing = tmp_path / "gone"
    argv = ["features", "--dataset", "camvid", "--data-root", str(missing), "--backbone",
            "tiny-vit", "--resolution", "16", "--num-workers", "0", "--quiet"]  # fmt: skip
    err = _one_line_error(capsys, argv)
    assert str(missing) in err


def test_features_unknown_backbone(tmp_path, camvid_root, capsys) -> None:
    argv = ["features", "--dataset", "camvid", "--data-root", str(camvid_root), "--backbone",
            "nope", "--quiet"]  # fmt: skip
    err = _one_line_error(capsys, argv)
    assert "unknown backbone 'nope'" in err and "tiny-vit" in err


def test_features_resolution_not_multiple_of_patch(tmp_path, camvid_root, capsys) -> None:
    argv = ["features", "--dataset", "camvid", "--data-root", str(camvid_root), "--backbone",
            "tiny-vit", "--resolution", "30", "--quiet"]  # fmt: skip
    err = _one_line_error(capsys, argv)
    assert "--resolution 24 or 32" in err


def test_knn_unknown_dataset(tmp_path, capsys) -> None:
    argv = ["knn", "--dataset", "nope", "--data-root", str(tmp_path), "--backbone", "tiny-vit",
            "--quiet"]  # fmt: skip
    err = _one_line_error(capsys, argv)
    assert "unknown dataset 'nope'" in err


def test_crop_unknown_dataset_and_missing_root(tmp_path, capsys) -> None:
    err = _one_line_error(capsys, ["crop", "--dataset", "nope", "--data-root", str(tmp_path)])
    assert "unknown dataset 'nope'" in err
    missing = tmp_path / "gone"
    err = _one_line_error(capsys, ["crop", "--dataset", "camvid", "--data-root", str(missing)])
    assert str(missing) in err


def test_predict_missing_model(tmp_path, capsys, helpers) -> None:
    images = helpers.write_folder(tmp_path / "in", 1, size=(16, 16))
    argv = ["predict", str(images), "--checkpoint", str(tmp_path / "nomodel"), "--out",
            str(tmp_path / "out"), "--quiet", "--workers", "0"]  # fmt: skip
    err = _one_line_error(capsys, argv)
    assert "nomodel" in err


def test_eval_missing_checkpoint(tmp_path, capsys) -> None:
    argv = ["eval", "--checkpoint", str(tmp_path / "nothing"), "--data-root", str(tmp_path),
            "--out", str(tmp_path / "eval"), "--dataset", "camvid", "--no-progress"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "nothing" in err


@pytest.mark.parametrize(
    "override", ["train.lr=.nan", "train.lr=.inf", "loss.pos_intra_shift=.nan"]
)
def test_non_finite_numbers_are_refused_up_front(override) -> None:
    """``--set train.lr=.nan`` must be refused when the config is read (naming the key), not
    found as a divergence after the backbone, the neighbour table and a training step."""
    from stego.config import load_config
    from stego.errors import StegoError

    with pytest.raises(StegoError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(overrides=[override])

"""Typed configuration: the single source of truth for every setting of a STEGO run.

Settings merge in one line of precedence: package defaults <- preset (``stego/presets/*.yaml``)
<- user YAML file <- ``--set section.key=value`` overrides. Every value is type-checked against
the dataclass field it lands in; unknown keys, wrong types and impossible values raise
:class:`stego.errors.StegoError` naming the key and the fix. The resolved config is saved next to
the outputs (``config.yaml``) and inside every checkpoint (:meth:`StegoConfig.to_dict`).
One module (~450 lines): every setting of both methods (STEGO, CAUSE) sits here with its reason.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from stego.errors import StegoError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "TrainConfig",
    "StegoConfig",
    "PRESET_DIR",
    "list_presets",
    "load_config",
    "parse_override",
]

PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class DataConfig:
    """Which images to train on and how they are prepared."""

    dataset: str = "cocostuff27"  # the paper's main benchmark; presets set their own
    data_root: str | None = None  # no sensible default: the user must say where the data lives
    split: str = "train"  # STEGO trains on the training split (labels never used by the head)
    # Split used for validation / checkpoint selection. None = hold out `val_images` images of
    # the training split, so the split reported at the end (e.g. val) never picks checkpoints
    # (the original selected on its evaluation split: a leak we avoid).
    val_split: str | None = None
    val_images: int = 64  # held-out images when val_split is None: enough for a stable mIoU
    crop_type: Literal["none", "five"] = "none"  # "five": 4 corners + centre, as the paper
    resolution: int = 224  # the paper trains at 224 (28x28 features with patch 8)
    # Image resize. "nearest" is the original's (PIL's NEAREST rule), set by the paper presets
    # so that results match the original's; bilinear is smoother for everything else. Labels
    # always use nearest whatever this says.
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    # The CRF's uint8 picture at evaluation: "round" gives back the stored bytes; "truncate" is
    # the original's (normalisation undone in float32, x * 255 cut), set by the paper presets.
    crf_image: Literal["round", "truncate"] = "round"
    # Where feature caches and neighbour tables go. None = <data_root>/stego-cache (shared by
    # `stego features`, `stego knn` and `stego train`), or a folder under ~/.cache/stego/data/
    # when the data root is read-only (stego.features.fingerprint.default_cache_root).
    cache_dir: str | None = None
    crop_dir: str | None = None  # where five-crops live; None = <data_root>/cropped (`stego crop`)
    skip_bad: bool = False  # folder dataset: skip unreadable images (listed in a warning)
    num_workers: int = 4  # data loading processes per device; 0 = in the main process
    batch_size: int = 16  # GLOBAL batch (split over devices x nodes), so results don't
    # depend on the number of GPUs; 16 is the paper's ViT-S/8 setting


@dataclass
class ModelConfig:
    """Backbone, head and probes."""

    backbone: str = "dino-vits8"  # the paper's small backbone; see `stego.models.registry`
    weights: str | None = None  # a local checkpoint instead of the registry's download
    layer: int | None = None  # None = last block, as the paper (counts from 1)
    head: Literal["nonlinear", "linear", "none"] = "nonlinear"  # paper default: linear + MLP
    code_dim: int = 70  # the paper's text; released checkpoints use 90 (COCO) and 100 (Cityscapes)
    dropout: float = 0.1  # channel dropout on features before the head, as the original
    # Cluster count. None = the dataset's class count + extra_clusters (paper protocol).
    n_clusters: int | None = None
    extra_clusters: int = 0  # over-clustering; extra clusters count as errors in the metrics
    # Training method. "stego": the paper's correlation distillation (the loss.* shifts and
    # weights). "cause": CAUSE (Kim et al., arXiv 2310.07379): a concept clusterbook fitted by
    # modularity, then a head trained by a concept-wise contrastive loss against an EMA teacher
    # (the loss.cause_* / train.cause_* keys; code_dim, dropout and the probes are shared).
    method: Literal["stego", "cause"] = "stego"
    # CAUSE head: "mlp" (linear + two-layer branch, like STEGO's) or "tr" (one transformer decoder
    # layer whose queries are the patches' concepts; needs a square training crop)
    cause_head: Literal["mlp", "tr"] = "mlp"


@dataclass
class LossConfig:
    """The STEGO correlation loss (reference section 4); the names follow the original code."""

    # Shifts: a number, or "auto" = calibrated label-free on the training features before
    # training (stego.features.calibration; the chosen values are saved in the run's config.yaml).
    pos_intra_shift: float | Literal["auto"] = 0.08  # b_self: paper ViT-S/8 COCO value
    pos_inter_shift: float | Literal["auto"] = 0.02  # b_knn
    neg_inter_shift: float | Literal["auto"] = 0.16  # b_rand
    # k-means pseudo-classes of the "auto" calibration; None = max(2, clusters // 2), at most 5
    auto_pseudo_classes: int | None = None
    pos_intra_weight: float = 0.67  # lambda_self
    pos_inter_weight: float = 0.25  # lambda_knn
    neg_inter_weight: float = 0.63  # lambda_rand
    feature_samples: int = 11  # S: an 11x11 grid of random points per image, as the original
    neg_samples: int = 5  # derangements per batch for the random term, as the original
    pointwise: bool = True  # spatial centring of feature correlations (off for Cityscapes)
    zero_clamp: bool = True  # clamp code correlations at 0: negatives only push apart to 0
    stabilize: bool = False  # also clamp at 0.8; the original's option, off in all presets
    # "true": a real derangement (no image paired with itself); "original": randperm with fixed
    # points moved to i+1, exactly as the original code
    derangement: Literal["true", "original"] = "true"
    # ---- CAUSE (model.method: cause); the values of its paper unless said otherwise
    cause_concepts: int = 2048  # clusterbook size K
    # Concept init. "data": random sub-sampled patch features of the training split; "uniform":
    # the original's tiny uniform +-1/K, with which the clusterbook collapsed to 7-28 live
    # concepts on DINOv2 CamVid features where data init kept 566 (docs/labelfree-experiments.md)
    cause_concept_init: Literal["data", "uniform"] = "data"
    cause_modularity_temperature: float = 0.1  # tanh temperature of the co-assignment
    cause_cell: int = 4  # one patch per cell x cell block of the feature grid, for both losses
    cause_temperature: float = 0.07  # contrastive softmax temperature
    cause_pos_threshold: float = 0.3  # concept cosine above which two patches are positives
    cause_neg_threshold: float = 0.1  # ... below which they are negatives (between: ignored)
    # Projection channels of the contrastive loss: 2048 in the paper; 256 as in the CPU
    # benchmark (benchmarks/labelfree.py), for an eighth of the bank's memory
    cause_proj_dim: int = 256
    cause_bank_size: int = 100  # teacher projections kept per concept (0 = no bank)
    cause_bank_keep: float = 0.5  # fraction of each step's rows added to the bank


@dataclass
class TrainConfig:
    """Optimisation, schedule of side tasks, hardware."""

    steps: int = 5000  # ViT-S/8 preset length; the loss plateaus well before on most data
    lr: float = 5e-4  # head Adam lr, the paper's value (no decay, no schedule)
    probe_lr: float = 5e-3  # probes learn 10x faster: they chase a moving code
    seed: int = 0  # seeds weights, data order, neighbour picks, loss sampling, dropout
    num_neighbors: int = 7  # positive drawn from ranks 1..7 of the kNN table, as the paper
    knn_k: int = 30  # neighbours kept per image in the table (the original keeps 30)
    val_every: int = 500  # steps between validations (cluster / linear mIoU); 0 = never
    checkpoint_every: int = 500  # steps between checkpoints; last.ckpt is always written
    log_every: int = 25  # steps between scalar logs: cheap, but TensorBoard files grow
    figure_every: int = 500  # steps between prediction figures in TensorBoard; 0 = never
    precision: str = "32-true"  # Lightning precision; "bf16-mixed" is faster on recent GPUs
    devices: int = 1  # devices per node; >1 uses DDP (gloo on CPU)
    num_nodes: int = 1  # machines; the global batch is split across devices x nodes
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    # Train from cached backbone features: ~20x faster and the same result, because the backbone
    # is frozen and the training images are prepared deterministically (resize + centre crop),
    # so every step would compute the same features again. true = build the cache (and the
    # neighbour table) on first use, reuse it afterwards; false = the backbone every step (only
    # for images that change from step to step, e.g. random augmentation added in your own
    # dataset code, or a disk too small for the cache); "auto" = use a finished cache, never
    # build one.
    use_feature_cache: bool | Literal["auto"] = True
    # After training, replace the gradient-trained cluster centroids by spherical k-means on the
    # training codes (k-means++, 10 restarts, lowest inertia; label-free). Off = the paper's
    # probe; on CamVid it gained ~5 mIoU (docs/benchmarks.md).
    kmeans_probe: bool = False
    # The linear probe (labels only; it never changes the head) is trained on logits upsampled
    # to at most this many times the feature map (labels resized nearest-exact); 0 = the label
    # size, as the original. Evaluation always scores every label pixel.
    linear_probe_upsample: int = 4
    # ---- CAUSE (model.method: cause); the schedule of benchmarks/labelfree.py
    # Clusterbook: Adam steps of data.batch_size images on the modularity objective. Fitted once
    # per (feature cache, settings, seed) and kept next to the cache (stego.features.clusterbook).
    cause_clusterbook_steps: int = 600
    cause_clusterbook_lr: float = 1e-3
    cause_lr: float = 1e-3  # head Adam lr (train.lr is STEGO's); train.probe_lr for the probes
    cause_weight_decay: float = 1e-4  # head Adam weight decay
    cause_grad_clip: float = 1.0  # max gradient norm of the head (0 = no clipping)
    cause_momentum: float = 0.99  # EMA teacher: teacher = m * teacher + (1 - m) * student


@dataclass
class StegoConfig:
    """All settings of a run, in four sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (YAML / checkpoint friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> StegoConfig:
        """Build and validate a config from a nested dict, e.g. one stored in a checkpoint."""
        config = cls()
        _merge(config, data, source)
        config.validate()
        return config

    def to_yaml(self) -> str:
        """The config as YAML text, sections in a fixed order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (atomically)."""
        from stego.atomic import atomic_write

        with atomic_write(path, "w") as handle:
            handle.write(self.to_yaml())

    def validate(self) -> None:
        """Reject impossible values with an error that names the key."""
        d, m, lo, t = self.data, self.model, self.loss, self.train
        for section_name, section in self.to_dict().items():
            for key, value in section.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise StegoError(f"{section_name}.{key} must be a finite number, got {value}")
        _positive("data.resolution", d.resolution)
        _positive("data.batch_size", d.batch_size)
        _at_least("data.num_workers", d.num_workers, 0)
        _at_least("data.val_images", d.val_images, 0)
        _positive("model.code_dim", m.code_dim)
        if not 0.0 <= m.dropout < 1.0:
            raise StegoError(f"model.dropout must be in [0, 1), got {m.dropout}")
        if m.n_clusters is not None:
            _positive("model.n_clusters", m.n_clusters)
        if m.layer is not None:
            _positive("model.layer", m.layer)
        _at_least("model.extra_clusters", m.extra_clusters, 0)
        if lo.auto_pseudo_classes is not None:
            _at_least("loss.auto_pseudo_classes", lo.auto_pseudo_classes, 2)
        _positive("loss.feature_samples", lo.feature_samples)
        _positive("loss.neg_samples", lo.neg_samples)
        for name in ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight"):
            _at_least(f"loss.{name}", getattr(lo, name), 0.0)
        _positive("train.steps", t.steps)
        _positive("train.lr", t.lr)
        _positive("train.probe_lr", t.probe_lr)
        _positive("train.knn_k", t.knn_k)
        _positive("train.num_neighbors", t.num_neighbors)
        if t.num_neighbors >= t.knn_k:
            raise StegoError(
                f"train.num_neighbors ({t.num_neighbors}) must be smaller than train.knn_k "
                f"({t.knn_k}): rank 0 of the table is the image itself"
            )
        _at_least("train.linear_probe_upsample", t.linear_probe_upsample, 0)
        for name in ("val_every", "checkpoint_every", "log_every", "figure_every"):
            _at_least(f"train.{name}", getattr(t, name), 0)
        self._validate_cause()
        _positive("train.devices", t.devices)
        _positive("train.num_nodes", t.num_nodes)
        world = t.devices * t.num_nodes
        if d.batch_size % world:
            raise StegoError(
                f"data.batch_size ({d.batch_size}) is the global batch and must be divisible by "
                f"train.devices x train.num_nodes ({world}); set data.batch_size to a multiple "
                f"of {world}"
            )

    def _validate_cause(self) -> None:
        """The CAUSE keys (checked whatever the method, so a config stays valid when switched)."""
        lo, t = self.loss, self.train
        for key in ("cause_concepts", "cause_cell", "cause_proj_dim"):
            _positive(f"loss.{key}", getattr(lo, key))
        for key in ("cause_modularity_temperature", "cause_temperature"):
            _positive(f"loss.{key}", getattr(lo, key))
        for key in ("cause_pos_threshold", "cause_neg_threshold"):
            if not -1.0 <= getattr(lo, key) <= 1.0:
                raise StegoError(
                    f"loss.{key} is a cosine and must be in [-1, 1], got {getattr(lo, key)}"
                )
        if lo.cause_neg_threshold > lo.cause_pos_threshold:
            raise StegoError(
                f"loss.cause_neg_threshold ({lo.cause_neg_threshold}) must not exceed "
                f"loss.cause_pos_threshold ({lo.cause_pos_threshold})"
            )
        _at_least("loss.cause_bank_size", lo.cause_bank_size, 0)
        if not 0.0 < lo.cause_bank_keep <= 1.0:
            raise StegoError(f"loss.cause_bank_keep must be in (0, 1], got {lo.cause_bank_keep}")
        _at_least("train.cause_clusterbook_steps", t.cause_clusterbook_steps, 0)
        if t.cause_clusterbook_steps == 0 and lo.cause_concept_init == "uniform":
            raise StegoError(
                "train.cause_clusterbook_steps=0 keeps the uniform concept init, which is "
                "noise; fit the clusterbook (steps > 0) or set loss.cause_concept_init=data"
            )
        for key in ("cause_clusterbook_lr", "cause_lr"):
            _positive(f"train.{key}", getattr(t, key))
        _at_least("train.cause_weight_decay", t.cause_weight_decay, 0.0)
        _at_least("train.cause_grad_clip", t.cause_grad_clip, 0.0)
        if not 0.0 <= t.cause_momentum < 1.0:
            raise StegoError(f"train.cause_momentum must be in [0, 1), got {t.cause_momentum}")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "train": TrainConfig,
}


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise StegoError(f"{key} must be > 0, got {value}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise StegoError(f"{key} must be >= {low}, got {value}")


def list_presets() -> list[str]:
    """Names of the presets shipped in ``stego/presets``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_NO_MATCH = object()


def _coerce(tp: Any, value: Any) -> Any:
    """Return ``value`` as type ``tp`` or ``_NO_MATCH``; never converts between bool and int."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return (
            value
            if any(value == a and type(value) is type(a) for a in typing.get_args(tp))
            else _NO_MATCH
        )
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(arg, value)
            if out is not _NO_MATCH:
                return out
        return _NO_MATCH
    if tp is type(None):
        return None if value is None else _NO_MATCH
    if tp is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _NO_MATCH
        return _NO_MATCH
    if tp is str:
        return value if isinstance(value, str) else _NO_MATCH
    raise TypeError(f"unsupported config field type {tp!r}")  # pragma: no cover


def _set_field(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = [f.name for f in dataclasses.fields(section)]
    if key not in names:
        raise StegoError(
            f"unknown key '{section_name}.{key}' in {source}; valid keys of '{section_name}': "
            f"{', '.join(names)}"
        )
    out = _coerce(hints[key], value)
    if out is _NO_MATCH:
        raise StegoError(
            f"{section_name}.{key} in {source} must be {_describe(hints[key])}, got {value!r} "
            f"({type(value).__name__})"
        )
    setattr(section, key, out)


def _merge(config: StegoConfig, data: Any, source: str) -> None:
    """Overwrite fields of ``config`` with the nested dict ``data`` (checked)."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise StegoError(f"{source} must be a mapping of sections ({', '.join(SECTIONS)})")
    for section_name, values in data.items():
        if section_name not in SECTIONS:
            raise StegoError(
                f"unknown section '{section_name}' in {source}; valid sections: "
                f"{', '.join(SECTIONS)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise StegoError(f"section '{section_name}' in {source} must be a mapping of keys")
        section = getattr(config, section_name)
        for key, value in values.items():
            _set_field(section, section_name, str(key), value, source)


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StegoError(f"{what} {path} not found; check the path") from None
    except yaml.YAMLError as exc:
        one_line = " ".join(str(exc).split())
        raise StegoError(f"{what} {path} is not valid YAML ({one_line}); fix the file") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``"section.key=value"`` into (section, key, YAML-parsed value)."""
    path, sep, raw = text.partition("=")
    parts = path.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise StegoError(
            f"override '{text}' must look like section.key=value (e.g. train.steps=100); "
            f"sections: {', '.join(SECTIONS)}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text, the type check decides
    return parts[0], parts[1], value


def load_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> StegoConfig:
    """Resolve a config: package defaults <- preset <- YAML ``file`` <- ``overrides``.

    ``overrides`` are strings ``"section.key=value"``; values are parsed with YAML
    (``null``, ``true``, ``5e-4``, ``[1, 2]``) and type-checked like file values.
    """
    config = StegoConfig()
    if preset is not None:
        valid = list_presets()
        if preset not in valid:
            raise StegoError(f"unknown preset '{preset}'; valid presets: {', '.join(valid)}")
        _merge(config, _read_yaml(PRESET_DIR / f"{preset}.yaml", "preset"), f"preset {preset}")
    if file is not None:
        path = Path(file).expanduser()
        _merge(config, _read_yaml(path, "config file"), f"config file {path}")
    for text in overrides:
        section, key, value = parse_override(text)
        _merge(config, {section: {key: value}}, f"override '{text}'")
    config.validate()
    return config

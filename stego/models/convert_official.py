"""Convert a checkpoint of the original STEGO code (a Lightning ``.ckpt``) to a stego model folder.

The original checkpoint's ``state_dict`` holds

- the DINO ViT under ``net.model.`` (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
  ``blocks.N.*``, ``norm.*``: the same names as timm's ViT),
- the head under ``net.cluster1.0.`` (a ``Sequential`` holding one 1x1 conv C->D; a bare
  ``net.cluster1.`` is accepted too) and ``net.cluster2.{0,2}.`` (1x1 convs C->C, C->D),
- ``cluster_probe.clusters`` (K, D) and ``linear_probe.weight`` (n, D, 1, 1) / ``.bias``,
- training-only parts: ``train_cluster_probe.clusters`` (a probe fitted on training batches) and
  ``decoder.*`` (a 1x1 conv D->C for a reconstruction loss), not needed for inference,

and its ``hyper_parameters`` hold ``n_classes`` and the training config (``cfg``, an omegaconf
``DictConfig``: ``model_type``, ``dino_patch_size``, ``dim``, ``dataset_name``,
``extra_clusters``...). Lightning 1.x adds ``callbacks`` (keyed by callback class),
``optimizer_states``, ``epoch``, ``global_step``... The file is read with
:mod:`stego.models.safe_pickle`, so a tampered checkpoint cannot run code. The backbone registry
name comes from the config (``vit_small`` + patch 8 -> ``dino-vits8``) unless ``backbone=`` is
given; the checkpoint's ViT weights must fit that backbone's shapes (the position embedding may
differ in grid size: timm resamples it). They are saved inside the model
(``include_backbone=True``), so the converted folder reproduces the original features exactly,
offline.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from stego.errors import StegoError

if TYPE_CHECKING:
    from stego.models.segmenter import Segmenter

__all__ = [
    "OfficialModel",
    "convert_official",
    "load_official",
    "official_config",
    "split_official_state",
]

_KNOWN_PREFIXES = (
    "net.model.",
    "net.cluster1.",
    "net.cluster2.",
    "cluster_probe.",
    "linear_probe.",
)
# Written by the original for training only: its train-time cluster probe and the decoder of
# its (unused by default) reconstruction loss.
_TRAINING_ONLY = ("train_cluster_probe.", "decoder.")


class OfficialModel(NamedTuple):
    """An original checkpoint read into stego: the model, its plain config, what was ignored."""

    model: Segmenter
    config: dict[str, Any]  # hyper_parameters: n_classes + the cfg keys, plain values
    ignored: list[str]  # state_dict keys not used (training-only and unknown ones)


def _state_dict(checkpoint: Any, path: Path) -> dict[str, Tensor]:
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("net.model.") for k in state):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise StegoError(
            f"{path} is not a checkpoint of the original STEGO code: expected a 'state_dict' with "
            f"'net.model.*' backbone weights, found {keys}"
        )
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def official_config(checkpoint: Any) -> dict[str, Any]:
    """The training config of an original checkpoint as a plain dict (``cfg`` merged over the
    other hyper-parameters)."""
    from stego.models.safe_pickle import to_plain

    hparams = (
        to_plain(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    )
    if not isinstance(hparams, dict):
        return {}
    cfg = hparams.get("cfg")
    merged = {k: v for k, v in hparams.items() if k != "cfg"}
    if isinstance(cfg, dict):
        merged.update(cfg)
    return merged


def split_official_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map the original names to :class:`stego.models.segmenter.Segmenter` names.

    Returns (renamed state without the backbone, sorted list of ignored keys).
    ``net.cluster1.0`` (or ``net.cluster1``) -> ``head.linear``, ``net.cluster2`` ->
    ``head.nonlinear``; ``linear_probe.weight`` -> ``linear_probe.conv.weight``;
    ``cluster_probe.clusters`` kept.
    """
    from stego.models.heads import original_key_map

    # The original's linear head is Sequential(Conv2d): its weights sit one level deeper.
    head = {k.replace("net.cluster1.0.", "net.cluster1.", 1): v for k, v in state.items()}
    out = {f"head.{k}": v for k, v in original_key_map(head, prefix="net.").items()}
    if "cluster_probe.clusters" in state:
        out["cluster_probe.clusters"] = state["cluster_probe.clusters"]
    for part in ("weight", "bias"):
        if f"linear_probe.{part}" in state:
            out[f"linear_probe.conv.{part}"] = state[f"linear_probe.{part}"]
    ignored = sorted(k for k in state if not k.startswith(_KNOWN_PREFIXES))
    return out, ignored


def _backbone_name(cfg: dict[str, Any], vit: dict[str, Tensor], path: Path) -> str:
    """Registry name from ``model_type`` / ``dino_patch_size`` (falling back to the weights)."""
    if cfg.get("arch", "dino") != "dino":
        raise StegoError(
            f"{path} uses arch {cfg.get('arch')!r}; only the DINO ViT checkpoints "
            "convert (pass backbone= to force a registry name)"
        )
    patch = int(cfg.get("dino_patch_size") or vit["patch_embed.proj.weight"].shape[-1])
    size = {"vit_small": "s", "vit_base": "b"}.get(str(cfg.get("model_type", "")))
    if size is None:
        size = {384: "s", 768: "b"}.get(int(vit["cls_token"].shape[-1]))
    if size is None:
        raise StegoError(
            f"cannot tell the backbone of {path} (model_type "
            f"{cfg.get('model_type')!r}); pass backbone= (--backbone NAME)"
        )
    return f"dino-vit{size}{patch}"


def _load_vit(backbone: Any, vit: dict[str, Tensor], path: Path) -> None:
    """Load DINO ViT weights into ``backbone.model`` strictly (pos-embed grid resampled by timm)."""
    from stego.models.weights import load_state

    try:
        backbone.weights_digest = load_state(backbone.model, vit, str(path))
    except StegoError as exc:
        raise StegoError(
            f"the ViT weights do not fit backbone {backbone.name}: {exc}; pass the right "
            "backbone= (--backbone NAME)"
        ) from exc


def _describe_ignored(ignored: list[str]) -> tuple[str, list[str]]:
    """(one line naming the training-only parts ignored, the unknown keys)."""
    parts = sorted({k.split(".")[0] for k in ignored if k.startswith(_TRAINING_ONLY)})
    unknown = [k for k in ignored if not k.startswith(_TRAINING_ONLY)]
    line = f"ignored {', '.join(parts)}: not needed for inference" if parts else ""
    return line, unknown


def load_official(
    ckpt_path: str | Path,
    *,
    dataset: str | None = None,
    backbone: str | None = None,
    log: Callable[[str], None] | None = None,
) -> OfficialModel:
    """Read an original STEGO ``.ckpt`` into a :class:`Segmenter` (in memory, eval mode).

    ``dataset`` (default: the config's ``dataset_name``) fills class names and palette;
    ``backbone`` overrides the registry name derived from the config. ``log`` receives one line
    naming the training-only parts left out; unknown extra weights are warned about.
    """
    from stego.data import dataset_info
    from stego.models.backbone import build_backbone
    from stego.models.safe_pickle import load_checkpoint
    from stego.models.segmenter import SegmenterMeta, build_segmenter

    path = Path(ckpt_path)
    checkpoint = load_checkpoint(path)
    state = _state_dict(checkpoint, path)
    cfg = official_config(checkpoint)
    vit = {k[len("net.model.") :]: v for k, v in state.items() if k.startswith("net.model.")}
    vit = {k: v for k, v in vit.items() if not k.startswith("head.")}  # DINO's Identity head
    if cfg.get("dino_feat_type", "feat") != "feat":
        raise StegoError(
            f"{path} was trained on {cfg['dino_feat_type']!r} features; only 'feat' "
            "(the released checkpoints' setting) is supported"
        )
    rest, ignored = split_official_state(state)
    line, unknown = _describe_ignored(ignored)
    if line and log is not None:
        log(f"{path.name}: {line}")
    if unknown:
        warnings.warn(
            f"{path}: ignoring {len(unknown)} weights stego does not use: "
            f"{', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}",
            stacklevel=2,
        )
    if "cluster_probe.clusters" not in rest or "head.linear.weight" not in rest:
        raise StegoError(
            f"{path} lacks net.cluster1.0.* (or net.cluster1.*) or cluster_probe.clusters; "
            "not a STEGO checkpoint"
        )

    name = backbone or _backbone_name(cfg, vit, path)
    net = build_backbone(name, pretrained=False)
    _load_vit(net, vit, path)
    in_dim = rest["head.linear.weight"].shape[1]
    if in_dim != net.embed_dim:
        raise StegoError(
            f"{path}: the head takes {in_dim} channels but backbone {name} gives "
            f"{net.embed_dim}; pass the right backbone="
        )
    dataset = dataset or cfg.get("dataset_name")
    meta = SegmenterMeta.from_state(
        rest,
        backbone=name,
        info=dataset_info(str(dataset)) if dataset else None,
        resolution=int(cfg.get("res", 224)),
        backbone_digest=net.weights_digest,
        extra={"converted_from": path.name},
    )
    model = build_segmenter(meta, state=rest, backbone=net, source=f"{path} (head / probes)")
    return OfficialModel(model.eval(), cfg, ignored)


def convert_official(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    dataset: str | None = None,
    backbone: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert an original STEGO ``.ckpt`` into a stego model folder; returns ``out_dir``.

    Arguments as :func:`load_official`; the folder includes the backbone weights.
    """
    from stego.models.pretrained import save_pretrained

    official = load_official(ckpt_path, dataset=dataset, backbone=backbone, log=log)
    return save_pretrained(
        official.model,
        out_dir,
        train_config={"official": _jsonable(official.config)},
        include_backbone=True,
    )


def _jsonable(obj: Any) -> Any:
    """Keep only JSON-friendly parts of the original config (for provenance)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return repr(obj)

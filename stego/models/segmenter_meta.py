"""What besides the weights is needed to rebuild and use a trained model
(:class:`SegmenterMeta`, saved in the model folder's ``config.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from stego.errors import StegoError

if TYPE_CHECKING:
    from stego.config import StegoConfig
    from stego.data.registry import DatasetInfo

__all__ = ["SegmenterMeta"]


@dataclass
class SegmenterMeta:
    """Everything besides weights that is needed to rebuild and use a trained model."""

    backbone: str
    backbone_layer: int | None
    head_kind: str
    code_dim: int
    n_clusters: int
    n_classes: int | None = None  # classes of the linear probe, when one was trained
    dataset: str | None = None
    class_names: list[str] | None = None
    palette: list[list[int]] | None = None  # RGB per cluster/class
    resolution: int = 224  # training resolution (shorter side)
    alpha: float = 2.0  # cluster-probe softmax temperature at prediction (the paper's 2)
    backbone_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_config(
        cls,
        config: StegoConfig,
        info: DatasetInfo,
        *,
        code_dim: int,
        n_clusters: int,
        n_classes: int | None,
        backbone_digest: str = "",
    ) -> SegmenterMeta:
        """The metadata of a model trained with ``config`` on the dataset described by ``info``.

        A CAUSE model (``model.method: cause``) has ``head_kind`` "cause-mlp" / "cause-tr" and
        its head's sizes in ``extra``: ``n_concepts`` (TR: the clusterbook it keeps) and
        ``n_positions`` (TR: the training grid's patch count).
        """
        m = config.model
        head_kind, extra = m.head, {}
        if m.method == "cause":
            head_kind = f"cause-{m.cause_head}"
            if m.cause_head == "tr":
                from stego.models.registry import patch_size

                side = config.data.resolution // patch_size(m.backbone)
                extra = {"n_concepts": config.loss.cause_concepts, "n_positions": side * side}
        return cls(
            backbone=m.backbone,
            backbone_layer=m.layer,
            head_kind=head_kind,
            extra=extra,
            code_dim=code_dim,
            n_clusters=n_clusters,
            n_classes=n_classes,
            resolution=config.data.resolution,
            backbone_digest=backbone_digest,
            **_dataset_fields(info),
        )

    @classmethod
    def from_state(
        cls,
        state: dict[str, Tensor],
        *,
        backbone: str,
        backbone_layer: int | None = None,
        info: DatasetInfo | None = None,
        resolution: int = 224,
        backbone_digest: str = "",
        extra: dict[str, Any] | None = None,
    ) -> SegmenterMeta:
        """The metadata of Segmenter weights ``state`` (head.*, cluster_probe.*, linear_probe.*).

        Code dim, cluster count, linear-probe classes and head kind are read from the tensors;
        dataset name, class names and palette from ``info`` (whose class count stands in when
        ``state`` has no linear probe, so predictions can still be named).
        """
        clusters = state.get("cluster_probe.clusters")
        if clusters is None:
            raise StegoError("the weights have no cluster_probe.clusters; not a STEGO model")
        linear = state.get("linear_probe.conv.weight")
        n_classes = int(linear.shape[0]) if linear is not None else None
        if "head.nonlinear.0.weight" in state:
            kind = "nonlinear"
        else:
            kind = "linear" if "head.linear.weight" in state else "none"
        fields = _dataset_fields(info) if info is not None else {}
        if n_classes is None and info is not None:
            n_classes = info.n_classes
        return cls(
            backbone=backbone,
            backbone_layer=backbone_layer,
            head_kind=kind,
            code_dim=int(clusters.shape[1]),
            n_clusters=int(clusters.shape[0]),
            n_classes=n_classes,
            resolution=resolution,
            backbone_digest=backbone_digest,
            extra=dict(extra or {}),
            **fields,
        )


def _dataset_fields(info: DatasetInfo) -> dict[str, Any]:
    """The dataset part of :class:`SegmenterMeta`: name, class names, palette (None: unknown)."""
    return {
        "dataset": info.name,
        "class_names": list(info.class_names) or None,
        "palette": info.palette.tolist() if len(info.palette) else None,
    }

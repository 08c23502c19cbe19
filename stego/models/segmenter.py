"""The inference model: frozen backbone + segmentation head + probes, for any image size.

Training produces the head and probes; :class:`Segmenter` bundles them with the backbone and the
metadata a user needs to read its output (class names, colours, preprocessing), and implements
the paper's prediction rule: code averaged over the image and its horizontal flip, upsampled
bilinearly to the output size, then ``log_softmax(alpha * cosine)`` for the cluster probe and
``log_softmax(logits)`` for the linear probe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.errors import StegoError

if TYPE_CHECKING:
    from stego.models.backbone import Backbone
    from stego.models.heads import SegmentationHead
    from stego.models.probes import ClusterProbe, LinearProbe

__all__ = ["Segmenter", "SegmenterMeta", "SegmenterOutput", "pad_to_multiple"]


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


class SegmenterOutput(NamedTuple):
    code: Tensor  # (B, D, h, w) code at feature resolution (flip-averaged)
    cluster_log_probs: Tensor  # (B, K, H, W) log-probabilities of the clusters at output size
    linear_log_probs: Tensor | None  # (B, n_classes, H, W) or None without a linear probe


def pad_to_multiple(images: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Pad (B, 3, H, W) on the bottom/right by edge replication to multiples of ``multiple``.

    Returns the padded images and the original (H, W), so outputs can be cropped back.
    """
    height, width = images.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
    return images, (height, width)


class Segmenter(nn.Module):
    """Backbone + head + cluster probe (+ optional linear probe), with the paper's prediction."""

    def __init__(
        self,
        backbone: Backbone,
        head: SegmentationHead,
        cluster_probe: ClusterProbe,
        linear_probe: LinearProbe | None,
        meta: SegmenterMeta,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cluster_probe = cluster_probe
        self.linear_probe = linear_probe
        self.meta = meta

    @classmethod
    def from_pretrained(cls, path: str, *, device: str | torch.device = "cpu") -> Segmenter:
        """Load a model saved by :func:`stego.models.pretrained.save_pretrained` (directory or hub id)."""
        from stego.models.pretrained import load

        return load(path, device=device)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_size)

    @torch.no_grad()
    def encode(self, images: Tensor, *, flip: bool = True) -> Tensor:
        """Codes (B, D, h, w) of images (B, 3, H, W) in [0, 1]; H, W multiples of the patch."""
        self.head.eval()
        code = self.head(self.backbone(images).feat).code
        if flip:
            flipped = self.head(self.backbone(images.flip(-1)).feat).code
            code = (code + flipped.flip(-1)) / 2
        return code

    @torch.no_grad()
    def forward(
        self, images: Tensor, *, flip: bool = True, size: tuple[int, int] | None = None
    ) -> SegmenterOutput:
        """Predict images (B, 3, H, W) in [0, 1] of any size.

        Images are padded to a multiple of the patch size and the output cropped back, so the
        log-probabilities have the images' own size, or ``size`` when given (e.g. label size).
        """
        code, padded_size, (height, width) = self._encode_padded(images, flip)
        full = _to_output_size(code, padded_size, (height, width), size)
        cluster = self.cluster_probe.log_probs(full, alpha=self.meta.alpha)
        linear = None
        if self.linear_probe is not None:
            linear = F.log_softmax(self.linear_probe(full), dim=1)
        return SegmenterOutput(code=code, cluster_log_probs=cluster, linear_log_probs=linear)

    def _encode_padded(
        self, images: Tensor, flip: bool
    ) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
        """Code (B, D, h, w) of the padded images, the padded size and the images' own size."""
        padded, own = pad_to_multiple(images, self.patch_size)
        return self.encode(padded, flip=flip), tuple(padded.shape[-2:]), own  # type: ignore[return-value]

    @torch.no_grad()
    def labels(
        self,
        images: Tensor,
        *,
        flip: bool = True,
        size: tuple[int, int] | None = None,
        probe: str = "cluster",
    ) -> Tensor:
        """Ids (B, H, W) int64 of images (B, 3, H, W): the argmax of :meth:`forward`'s maps.

        Cheaper than ``forward(...).cluster_log_probs.argmax(1)`` and equal to it: the cosine
        with centroid k is ``code . c_k / |code|`` (c_k unit-norm), and ``|code| > 0`` is the
        same for every k, so the argmax only needs the dot products; those are linear in the
        code, so they are computed at feature resolution (K channels instead of D) and then
        upsampled exactly as the code would be. Likewise for the linear probe's logits (a 1x1
        convolution commutes with bilinear interpolation). Only exact float ties can differ.
        """
        return self.labels_by_probe(images, flip=flip, size=size, probes=(probe,))[probe]

    @torch.no_grad()
    def labels_by_probe(
        self,
        images: Tensor,
        *,
        flip: bool = True,
        size: tuple[int, int] | None = None,
        probes: tuple[str, ...] = ("cluster", "linear"),
    ) -> dict[str, Tensor]:
        """:meth:`labels` of several probes from one backbone pass: {probe: (B, H, W) int64}."""
        code, padded_size, own = self._encode_padded(images, flip)
        out = {}
        for probe in probes:
            if probe == "cluster":
                centroids = F.normalize(self.cluster_probe.clusters, dim=1, eps=1e-12)
                scores = torch.einsum("bdhw,kd->bkhw", code, centroids)  # (B, K, h, w)
            elif probe == "linear":
                if self.linear_probe is None:
                    raise StegoError("probe='linear' needs a model with a linear probe")
                scores = self.linear_probe(code)  # (B, n_classes, h, w)
            else:
                raise StegoError(f"unknown probe {probe!r}; valid: cluster, linear")
            # max(dim).indices: the first maximum, like argmax, and several times faster on CPU
            out[probe] = _to_output_size(scores, padded_size, own, size).max(dim=1).indices
        return out

    def predict(self, images: Tensor, *, flip: bool = True) -> Tensor:
        """Cluster ids (B, H, W) int64 at the images' own size."""
        return self.labels(images, flip=flip)


def _to_output_size(
    maps: Tensor,
    padded_size: tuple[int, int],
    own_size: tuple[int, int],
    size: tuple[int, int] | None,
) -> Tensor:
    """Upsample maps (B, C, h, w) to the padded input size, crop the padding, then resize to
    ``size`` if given: (B, C, H, W). Bilinear, align_corners=False (the paper's rule)."""
    full = F.interpolate(maps, size=padded_size, mode="bilinear", align_corners=False)
    full = full[..., : own_size[0], : own_size[1]]
    if size is not None and tuple(size) != tuple(own_size):
        full = F.interpolate(full, size=size, mode="bilinear", align_corners=False)
    return full

"""The inference model: frozen backbone + segmentation head + probes, for any image size.

Training produces the head and probes; :class:`Segmenter` bundles them with the backbone and the
metadata a user needs to read its output (class names, colours, preprocessing), and implements
the paper's prediction rule: code averaged over the image and its horizontal flip, upsampled
bilinearly to the output size, then ``log_softmax(alpha * cosine)`` for the cluster probe and
``log_softmax(logits)`` for the linear probe.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.data.transforms import pad_to_multiple
from stego.errors import StegoError
from stego.models.class_map import ClassMap, read_class_map, remove_class_map, write_class_map
from stego.models.heads import SegmentationHead
from stego.models.probes import ClusterProbe, LinearProbe
from stego.models.segmenter_meta import SegmenterMeta

if TYPE_CHECKING:
    from stego.models.backbone import Backbone

__all__ = ["PaddedCode", "Segmenter", "SegmenterMeta", "SegmenterOutput", "build_segmenter"]


class SegmenterOutput(NamedTuple):
    code: Tensor  # (B, D, h, w) code at feature resolution (flip-averaged)
    cluster_log_probs: Tensor  # (B, K, H, W) log-probabilities of the clusters at output size
    linear_log_probs: Tensor | None  # (B, n_classes, H, W) or None without a linear probe
    # (B, C, H, W) log-probabilities of the named classes (None until the clusters are named):
    # the pixel classifier's, or the sums of each class's cluster probabilities
    class_log_probs: Tensor | None = None


class PaddedCode(NamedTuple):
    """Codes of images padded to a multiple of the patch size (:meth:`Segmenter.encode_any`)."""

    code: Tensor  # (B, D, h, w), h = padded height / patch
    padded_size: tuple[int, int]  # (H', W') fed to the backbone
    own_size: tuple[int, int]  # (H, W) of the images before padding
    # (B, C, h, w) backbone features (flip-averaged like the code), when asked for: the pixel
    # classifier of named classes needs them (Segmenter.needs_features)
    feat: Tensor | None = None


PROBES = ("class", "cluster", "linear")


class Segmenter(nn.Module):
    """Backbone + head + cluster probe (+ optional linear probe), with the paper's prediction.

    ``classes`` (a :class:`stego.models.class_map.ClassMap`, None until the clusters are named)
    maps cluster ids to class ids: once set, :meth:`predict` returns class ids by default.
    """

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
        self.classes: ClassMap | None = None

    def set_classes(self, classes: ClassMap | None) -> None:
        """Name the clusters (``classes.mapping``: cluster id -> class id), or unname them."""
        if classes is not None and classes.n_clusters != self.meta.n_clusters:
            raise StegoError(
                f"the class map names {classes.n_clusters} clusters but the model has "
                f"{self.meta.n_clusters}; name this model's clusters again (stego name)"
            )
        classifier = classes.classifier if classes is not None else None
        dims = (int(self.meta.code_dim), int(self.backbone.embed_dim))
        if classifier is not None and (classifier.code_dim, classifier.feat_dim) != dims:
            raise StegoError(
                f"the pixel classifier reads codes of {classifier.code_dim} and features of "
                f"{classifier.feat_dim} channels, but the model has {dims[0]} and {dims[1]}; "
                "fit it again on this model (stego segment --labels)"
            )
        self.classes = classes

    @property
    def needs_features(self) -> bool:
        """True when class prediction needs the backbone features beside the codes (the
        classes were fit by a pixel classifier, :mod:`stego.models.pixel_classifier`)."""
        return self.classes is not None and self.classes.classifier is not None

    def default_probe(self) -> str:
        """The default probe: "class" once the clusters are named, else "cluster"."""
        return "class" if self.classes is not None else "cluster"

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        backbone_weights: str | Path | None = None,
    ) -> Segmenter:
        """Load a model saved by :meth:`save_pretrained` (a directory or a hub id)."""
        from stego.models.files import WEIGHTS_FILE, read_model_dir

        config, state, directory = read_model_dir(path)
        try:
            meta = SegmenterMeta.from_dict(config["meta"])
        except TypeError as exc:
            raise StegoError(f"{directory} has an invalid model config ({exc})") from exc
        included = bool(config.get("includes_backbone"))
        model = build_segmenter(
            meta,
            state=state,
            backbone_weights=backbone_weights,
            backbone_pretrained=not included,  # included: weights come from the state
            source=str(directory / WEIGHTS_FILE),
        )
        model.set_classes(read_class_map(directory))
        digest = getattr(model.backbone, "weights_digest", "")
        if meta.backbone_digest and digest and digest != meta.backbone_digest and not included:
            warnings.warn(
                f"backbone weights differ from the ones this model was trained with "
                f"({digest} != {meta.backbone_digest}); predictions may be poor",
                stacklevel=2,
            )
        return model.to(device).eval()

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        train_config: dict[str, Any] | None = None,
        include_backbone: bool = False,
    ) -> Path:
        """Write the model to ``directory`` (created; see :mod:`stego.models.files`), with its
        class map in ``classes.json`` when the clusters are named."""
        from stego.models.files import write_model_dir

        state = {
            name: tensor
            for name, tensor in self.state_dict().items()
            if include_backbone or not name.startswith("backbone.")
        }
        self.meta.backbone_digest = str(getattr(self.backbone, "weights_digest", ""))
        config = {
            "meta": self.meta.to_dict(),
            "includes_backbone": include_backbone,
            "train_config": train_config,
        }
        written = write_model_dir(directory, state, config)
        if self.classes is not None:
            write_class_map(written, self.classes)
        else:  # a class map left by an earlier save would name other clusters
            remove_class_map(written)
        return written

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_size)

    @torch.no_grad()
    def encode(self, images: Tensor, *, flip: bool = True) -> Tensor:
        """Codes (B, D, h, w) of images (B, 3, H, W) in [0, 1]; H, W multiples of the patch."""
        return self.encode_with_features(images, flip=flip)[0]

    @torch.no_grad()
    def encode_with_features(self, images: Tensor, *, flip: bool = True) -> tuple[Tensor, Tensor]:
        """Codes (B, D, h, w) and backbone features (B, C, h, w) of images (B, 3, H, W) in
        [0, 1], both averaged with the horizontal flip's when ``flip``."""
        self.head.eval()
        feat = self.backbone(images).feat
        code = self.head(feat).code
        if flip:
            feat_flip = self.backbone(images.flip(-1)).feat
            code = (code + self.head(feat_flip).code.flip(-1)) / 2
            feat = (feat + feat_flip.flip(-1)) / 2
        return code, feat

    @torch.no_grad()
    def forward(
        self, images: Tensor, *, flip: bool = True, size: tuple[int, int] | None = None
    ) -> SegmenterOutput:
        """Predict images (B, 3, H, W) in [0, 1] of any size.

        Images are padded to a multiple of the patch size and the output cropped back, so the
        log-probabilities have the images' own size, or ``size`` when given (e.g. label size).
        """
        found = self.encode_any(images, flip=flip, with_features=self.needs_features)
        code, padded_size, own = found.code, found.padded_size, found.own_size
        full = _to_output_size(code, padded_size, own, size)
        cluster = self.cluster_probe.log_probs(full, alpha=self.meta.alpha)
        linear = classes = None
        if self.linear_probe is not None:
            linear = F.log_softmax(self.linear_probe(full), dim=1)
        if self.classes is not None and self.classes.classifier is not None:
            logits = self.classes.classifier(code, found.feat)  # (B, C, h, w)
            classes = F.log_softmax(_to_output_size(logits, padded_size, own, size), dim=1)
        elif self.classes is not None:
            classes = self.classes.merge_log_probs(cluster)
        return SegmenterOutput(code, cluster, linear, classes)

    @torch.no_grad()
    def encode_any(
        self, images: Tensor, *, flip: bool = True, with_features: bool = False
    ) -> PaddedCode:
        """:meth:`encode` of images (B, 3, H, W) in [0, 1] of any size: padded at the bottom /
        right to a multiple of the patch (replicated edge), as prediction pads them; with the
        backbone features too when ``with_features``."""
        padded = pad_to_multiple(images, self.patch_size, mode="replicate")
        size = (int(padded.tensor.shape[-2]), int(padded.tensor.shape[-1]))
        code, feat = self.encode_with_features(padded.tensor, flip=flip)
        return PaddedCode(
            code, size, (padded.height, padded.width), feat if with_features else None
        )

    @torch.no_grad()
    def ids_from_code(
        self, found: PaddedCode, *, size: tuple[int, int] | None = None, probe: str | None = None
    ) -> Tensor:
        """The ids (B, H, W) int64 :meth:`predict` gives, from codes :meth:`encode_any` made."""
        code, padded_size, own = found.code, found.padded_size, found.own_size
        probe = probe or self.default_probe()
        if probe == "class":
            if self.classes is None:
                raise StegoError(
                    "probe='class' needs named clusters: name them with `stego name` (or "
                    "Segmenter.set_classes), or use probe='cluster'"
                )
            if self.classes.classifier is None:
                ids = self.ids_from_code(found, size=size, probe="cluster")
                return self.classes.lookup().to(ids.device)[ids]
            if found.feat is None:
                raise StegoError(
                    "these classes are predicted from codes and backbone features: encode "
                    "with encode_any(..., with_features=True)"
                )
            # logits are linear in the (unit) inputs: computed at feature resolution, then
            # upsampled, as the cluster scores below
            scores = self.classes.classifier(code, found.feat)  # (B, C, h, w)
        elif probe == "cluster":
            centroids = F.normalize(self.cluster_probe.clusters, dim=1, eps=1e-12)
            scores = torch.einsum("bdhw,kd->bkhw", code, centroids)  # (B, K, h, w)
        elif probe == "linear":
            if self.linear_probe is None:
                raise StegoError("probe='linear' needs a model with a linear probe")
            scores = self.linear_probe(code)  # (B, n_classes, h, w)
        else:
            raise StegoError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
        # max(dim).indices: the first maximum, like argmax, and several times faster on CPU
        return _to_output_size(scores, padded_size, own, size).max(dim=1).indices

    @torch.no_grad()
    def log_probs_from_code(
        self, found: PaddedCode, *, size: tuple[int, int] | None = None, probe: str = "cluster"
    ) -> Tensor:
        """:meth:`forward`'s log-probabilities (B, K, H, W) of ``probe`` (cluster, linear, or
        class: the pixel classifier's, or the clusters' merged by :attr:`classes`), from codes
        :meth:`encode_any` made."""
        if probe not in PROBES:
            raise StegoError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
        if probe == "linear" and self.linear_probe is None:
            raise StegoError("probe='linear' needs a model with a linear probe; use 'cluster'")
        if probe == "class" and self.classes is None:
            raise StegoError("probe='class' needs named clusters (stego name); use 'cluster'")
        if probe == "class" and self.classes.classifier is not None:
            if found.feat is None:
                raise StegoError(
                    "these classes are predicted from codes and backbone features: encode "
                    "with encode_any(..., with_features=True)"
                )
            logits = self.classes.classifier(found.code, found.feat)  # (B, C, h, w)
            return F.log_softmax(
                _to_output_size(logits, found.padded_size, found.own_size, size), dim=1
            )
        full = _to_output_size(found.code, found.padded_size, found.own_size, size)
        if probe == "linear":
            return F.log_softmax(self.linear_probe(full), dim=1)
        cluster = self.cluster_probe.log_probs(full, alpha=self.meta.alpha)
        return cluster if probe == "cluster" else self.classes.merge_log_probs(cluster)

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        *,
        flip: bool = True,
        size: tuple[int, int] | None = None,
        probe: str | None = None,
    ) -> Tensor:
        """Ids (B, H, W) int64 of images (B, 3, H, W) in [0, 1]: the argmax of :meth:`forward`'s
        maps of ``probe`` ("cluster" or "linear"), at the images' own size or ``size``;
        "class": the cluster ids mapped to class ids by :attr:`classes`. Default: "class" once
        the clusters are named, else "cluster".

        Cheaper than ``forward(...).cluster_log_probs.argmax(1)`` and equal to it: the cosine
        with centroid k is ``code . c_k / |code|`` (c_k unit-norm), and ``|code| > 0`` is the
        same for every k, so the argmax only needs the dot products; those are linear in the
        code, so they are computed at feature resolution (K channels instead of D) and then
        upsampled exactly as the code would be. Likewise for the linear probe's logits (a 1x1
        convolution commutes with bilinear interpolation). Only exact float ties can differ.
        """
        probe = probe or self.default_probe()
        return self.predict_probes(images, flip=flip, size=size, probes=(probe,))[probe]

    @torch.no_grad()
    def predict_probes(
        self,
        images: Tensor,
        *,
        flip: bool = True,
        size: tuple[int, int] | None = None,
        probes: tuple[str, ...] = ("cluster", "linear"),
    ) -> dict[str, Tensor]:
        """:meth:`predict` of several probes from one backbone pass: {probe: (B, H, W) int64}."""
        features = self.needs_features and "class" in probes
        found = self.encode_any(images, flip=flip, with_features=features)
        return {probe: self.ids_from_code(found, size=size, probe=probe) for probe in probes}

    def labels(self, images: Tensor, **kwargs: Any) -> Tensor:
        """Deprecated alias of :meth:`predict` (stego 0.1); removed in 0.3."""
        warnings.warn("Segmenter.labels is now Segmenter.predict", DeprecationWarning, 2)
        return self.predict(images, **kwargs)

    def labels_by_probe(self, images: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        """Deprecated alias of :meth:`predict_probes` (stego 0.1); removed in 0.3."""
        warnings.warn(
            "Segmenter.labels_by_probe is now Segmenter.predict_probes", DeprecationWarning, 2
        )
        return self.predict_probes(images, **kwargs)


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


def build_segmenter(
    meta: SegmenterMeta,
    *,
    state: dict[str, Tensor] | None = None,
    backbone: Backbone | None = None,
    backbone_weights: str | Path | None = None,
    backbone_pretrained: bool = True,
    source: str = "the weights",
) -> Segmenter:
    """The one place a :class:`Segmenter` is assembled: backbone, head, probes from ``meta``.

    ``backbone`` is reused when given, else built from the registry (``backbone_weights``: a
    local file instead of the registry's weights; ``backbone_pretrained=False``: random init,
    for weights that come with ``state``). ``state`` (a Segmenter state dict, the backbone's
    entries optional) is loaded strictly; ``source`` names it in errors. A linear probe is built
    when ``meta.n_classes`` is set and ``state`` holds its weights (or no state is given).
    """
    from stego.models.backbone import build_backbone

    if backbone is None:
        backbone = build_backbone(
            meta.backbone,
            weights=backbone_weights,
            layer=meta.backbone_layer,
            pretrained=backbone_pretrained,
        )
    head = _build_head(meta, backbone.embed_dim)
    cluster = ClusterProbe(head.out_dim, meta.n_clusters)
    has_linear = state is None or any(k.startswith("linear_probe.") for k in state)
    linear = LinearProbe(head.out_dim, meta.n_classes) if meta.n_classes and has_linear else None
    model = Segmenter(backbone, head, cluster, linear, meta)
    if state is not None:
        _load_state(
            model, state, source, backbone_included=any(k.startswith("backbone.") for k in state)
        )
    return model


def _build_head(meta: SegmenterMeta, in_dim: int) -> nn.Module:
    """STEGO's head of ``meta.head_kind``, or a CAUSE head for "cause-mlp" / "cause-tr"."""
    if meta.head_kind.startswith("cause-"):
        from stego.models.cause_heads import CauseCodeHead

        return CauseCodeHead(
            meta.head_kind.removeprefix("cause-"),
            in_dim,
            meta.code_dim,
            n_concepts=meta.extra.get("n_concepts"),
            n_positions=meta.extra.get("n_positions"),
        )
    return SegmentationHead(in_dim, meta.code_dim, kind=meta.head_kind)


def _load_state(
    model: Segmenter, state: dict[str, Tensor], source: str, *, backbone_included: bool
) -> None:
    """Load ``state`` into ``model``: every non-backbone weight must be there and fit."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise StegoError(
            f"{source} does not match its config ({exc}); save the model again"
        ) from exc
    missing = [k for k in missing if backbone_included or not k.startswith("backbone.")]
    if missing or unexpected:
        raise StegoError(
            f"{source} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )

"""A per-pixel classifier fit on a few labelled images: the class of every pixel from its code
and its backbone feature.

Naming clusters by their labelled pixels' majority gives each cluster one class, so a cluster's
mistakes stay however many images are labelled. A multinomial logistic regression on each
pixel's [unit code, unit backbone feature] (the linear probe's machinery with few labels) keeps
improving with more labels: on held-out CamVid sequences with 10 labelled images it beat
majority naming of 44 clusters by 4.4 mIoU (0006R0; docs/benchmarks.md, "Naming clusters").

The weights are stored beside the class map (``classes.safetensors``, see
:mod:`stego.models.class_map`); no pickle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PixelClassifier", "classifier_inputs", "fit_pixel_classifier"]

# Bias of classes without a single labelled sample: never predicted (a class the labels do not
# show cannot be learnt; the fit warns about it).
ABSENT_BIAS = -1e4


def classifier_inputs(code: Tensor, feat: Tensor) -> Tensor:
    """[unit code, unit feature] along dim 1: code (B, D, ...) and feat (B, C, ...) ->
    (B, D + C, ...). Unit length each, so neither part dominates by its scale; written with
    explicit norms (no ``F.normalize``) so the ONNX export has only basic operators."""
    code_n = code / code.norm(dim=1, keepdim=True).clamp_min(1e-12)
    feat_n = feat / feat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([code_n, feat_n], dim=1)


class PixelClassifier(nn.Module):
    """Logits (B, n_classes, h, w) of codes (B, D, h, w) and backbone features (B, C, h, w)."""

    def __init__(self, code_dim: int, feat_dim: int, n_classes: int) -> None:
        super().__init__()
        self.code_dim, self.feat_dim, self.n_classes = code_dim, feat_dim, n_classes
        self.linear = nn.Linear(code_dim + feat_dim, n_classes)

    def forward(self, code: Tensor, feat: Tensor) -> Tensor:
        x = classifier_inputs(code, feat)  # (B, D + C, h, w)
        # a 1x1 convolution: the same linear map at every pixel
        return F.conv2d(x, self.linear.weight[:, :, None, None], self.linear.bias)

    def state(self) -> dict[str, Tensor]:
        """The weights to save: ``weight`` (n_classes, D + C), ``bias`` (n_classes,)."""
        return {
            "weight": self.linear.weight.detach().cpu().contiguous(),
            "bias": self.linear.bias.detach().cpu().contiguous(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Tensor], code_dim: int) -> PixelClassifier:
        """Rebuild from :meth:`state`; ``code_dim`` splits the inputs into code and feature."""
        n_classes, in_dim = state["weight"].shape
        model = cls(code_dim, int(in_dim) - code_dim, int(n_classes))
        model.linear.load_state_dict(state)
        return model.eval()


def fit_pixel_classifier(
    x: Tensor,
    y: Tensor,
    *,
    code_dim: int,
    n_classes: int,
    decay: float = 1e-4,
    max_iter: int = 200,
) -> PixelClassifier:
    """Multinomial logistic regression of classes ``y`` (P,) int64 on inputs ``x`` (P, D + C)
    (rows of :func:`classifier_inputs`), fit by L-BFGS with an L2 penalty ``decay``.

    torch's L-BFGS rather than scikit-learn: torch is already a dependency (scikit-learn is
    not), and this is the fit measured in benchmarks/naming.py. Deterministic on the CPU for
    the same rows. Classes without a sample get a bias of ``ABSENT_BIAS`` (never predicted).
    """
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
        torch.manual_seed(0)  # (the loss is convex: the optimum barely depends on them)
        model = PixelClassifier(code_dim, int(x.shape[1]) - code_dim, n_classes)
    layer = model.linear
    optimizer = torch.optim.LBFGS(
        layer.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe"
    )
    x, y = x.float(), y.long()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x), y) + decay * layer.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may run under no_grad
        optimizer.step(closure)
    with torch.no_grad():
        absent = torch.bincount(y, minlength=n_classes) == 0
        layer.bias[absent] = ABSENT_BIAS
    return model.eval()

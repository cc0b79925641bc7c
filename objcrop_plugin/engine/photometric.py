"""Photometric augmentations of the host SSL methods, as lightly defines their defaults.

Like the crop policies, each augmentation is split into a random parameter draw
(:meth:`Photometric.draw`, inspectable and replayable) and a deterministic kernel
(:meth:`Photometric.apply_pil`). The kernels are torchvision's PIL kernels and PIL's Gaussian
blur and solarisation, the same ones lightly's transforms run, so a view differs from lightly's
only in where it was cropped.

Presets (``make_photometrics(name)``), lightly 1.6 defaults:

=========  ==========================  =====  ===========  ==========  ===================
preset     colour jitter (b, c, s, h)  gray   blur p       solarize p  order
=========  ==========================  =====  ===========  ==========  ===================
mocov2     0.4, 0.4, 0.4, 0.1  p=0.8   0.2    0.5          0           flip cj gray blur
simclr     0.8, 0.8, 0.8, 0.2  p=0.8   0.2    0.5          0           flip cj gray blur
byol       0.4, 0.4, 0.2, 0.1  p=0.8   0.2    1.0 / 0.1    0 / 0.2     flip cj gray blur sol
vicreg     0.4, 0.4, 0.2, 0.1  p=0.8   0.2    0.5          0.1         flip cj gray sol blur
none       -                   -      -            -           (normalise only)
=========  ==========================  =====  ===========  ==========  ===================

Blur sigma is uniform in (0.1, 2); horizontal flip p=0.5; ImageNet normalisation. BYOL is
asymmetric: its first global view gets blur 1.0, the second blur 0.1 and solarisation 0.2.

References:
    - Chen et al., "Improved Baselines with Momentum Contrastive Learning" (MoCo v2), 2020.
    - Chen et al., "A Simple Framework for Contrastive Learning" (SimCLR), ICML 2020.
    - Grill et al., "Bootstrap Your Own Latent" (BYOL), NeurIPS 2020.
    - Bardes et al., "VICReg", ICLR 2022.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "Photometric",
    "PhotometricParams",
    "PhotometricSet",
    "make_photometrics",
    "to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PhotometricParams:
    """The random draw for one view; ``None`` / ``False`` means "not applied"."""

    flip: bool = False
    jitter_order: tuple[int, ...] | None = None  # permutation of (brightness, contrast, sat, hue)
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    grayscale: bool = False
    blur_sigma: float | None = None
    solarize: bool = False


@dataclass(frozen=True)
class Photometric:
    """One view's photometric augmentation (probabilities and ranges).

    Input to this transform: a PIL RGB image (the already cropped and resized view).

    Output of this transform: a float tensor ``(3, H, W)``, normalised with ``mean``/``std``
    (or in [0, 1] when ``normalize=False``).
    """

    hflip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    solarize_threshold: int = 128
    solarize_before_blur: bool = False
    normalize: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def draw(self, rng: np.random.Generator) -> PhotometricParams:
        """Draw this view's parameters (torchvision ColorJitter semantics: factors uniform in
        ``[max(0, 1 - s), 1 + s]``, hue in ``[-h, h]``, the four in a random order)."""
        flip = rng.random() < self.hflip
        order, b, c, s, h = None, 1.0, 1.0, 1.0, 0.0
        if rng.random() < self.jitter:
            order = tuple(int(i) for i in rng.permutation(4))
            b = rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
            c = rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)
            s = rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)
            h = rng.uniform(-self.hue, self.hue)
        gray = rng.random() < self.grayscale
        sigma = rng.uniform(*self.blur_sigma) if rng.random() < self.blur else None
        sol = rng.random() < self.solarize
        return PhotometricParams(flip, order, b, c, s, h, gray, sigma, sol)

    def apply_pil(self, img: Image.Image, p: PhotometricParams) -> Image.Image:
        """Apply drawn parameters to a PIL RGB image (deterministic)."""
        if p.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if p.jitter_order is not None:
            for op in p.jitter_order:
                if op == 0 and p.brightness != 1.0:
                    img = TF.adjust_brightness(img, p.brightness)
                elif op == 1 and p.contrast != 1.0:
                    img = TF.adjust_contrast(img, p.contrast)
                elif op == 2 and p.saturation != 1.0:
                    img = TF.adjust_saturation(img, p.saturation)
                elif op == 3 and p.hue != 0.0:
                    img = TF.adjust_hue(img, p.hue)
        if p.grayscale:
            img = img.convert("L").convert("RGB")
        if p.solarize and self.solarize_before_blur:
            img = ImageOps.solarize(img, self.solarize_threshold)
        if p.blur_sigma is not None:
            img = img.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
        if p.solarize and not self.solarize_before_blur:
            img = ImageOps.solarize(img, self.solarize_threshold)
        return img

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        return to_tensor(img, self.mean if self.normalize else None, self.std)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        return self.to_tensor(self.apply_pil(img, self.draw(rng)))


def to_tensor(
    img: Image.Image,
    mean: tuple[float, ...] | None = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """PIL RGB -> float tensor ``(3, H, W)``: ``(x / 255 - mean) / std`` in one fused pass."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    out = arr.to(torch.float32)
    if mean is None:
        return out.mul_(1.0 / 255.0)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return out.mul_(scale).add_(bias)


@dataclass(frozen=True)
class PhotometricSet:
    """Which photometric augmentation each view of a recipe gets.

    Global view ``g`` gets ``globals_[g % len(globals_)]`` (so BYOL's two asymmetric views
    alternate); every local view gets ``local``.
    """

    name: str
    globals_: tuple[Photometric, ...]
    local: Photometric = field(default_factory=Photometric)

    def for_view(self, index: int, local: bool) -> Photometric:
        if local:
            return self.local
        return self.globals_[index % len(self.globals_)]


#: the preset names :func:`photometrics` takes
PRESETS = ("mocov2", "simclr", "byol", "vicreg", "none")


def _preset(name: str) -> PhotometricSet:
    if name == "mocov2":
        p = Photometric()
        return PhotometricSet(name, (p,), p)
    if name == "simclr":
        p = Photometric(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
        return PhotometricSet(name, (p,), p)
    if name == "byol":
        v1 = Photometric(saturation=0.2, blur=1.0, solarize=0.0)
        v2 = replace(v1, blur=0.1, solarize=0.2)
        return PhotometricSet(name, (v1, v2), replace(v1, blur=0.5))
    if name == "vicreg":
        p = Photometric(saturation=0.2, solarize=0.1, solarize_before_blur=True)
        return PhotometricSet(name, (p,), p)
    if name == "none":
        p = Photometric(hflip=0.0, jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)
        return PhotometricSet(name, (p,), p)
    raise ValueError(f"unknown photometric preset '{name}'; choose one of {', '.join(PRESETS)}")


def make_photometrics(
    spec: str | Photometric | PhotometricSet = "mocov2", normalize: bool = True
) -> PhotometricSet:
    """A :class:`PhotometricSet` from a preset name, one :class:`Photometric`, or a set."""
    if isinstance(spec, PhotometricSet):
        return spec
    if isinstance(spec, Photometric):
        return PhotometricSet("custom", (spec,), spec)
    pset = _preset(spec)
    if not normalize:
        pset = PhotometricSet(
            pset.name,
            tuple(replace(p, normalize=False) for p in pset.globals_),
            replace(pset.local, normalize=False),
        )
    return pset

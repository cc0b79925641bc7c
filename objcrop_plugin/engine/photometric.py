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

Colour-jitter kernels (``Photometric.jitter_kernel``; every preset defaults to ``"exact"``):

- ``"exact"``: torchvision's PIL kernels one after another in the drawn order, as lightly.
- ``"fast"``: brightness, contrast, saturation and hue composed, in the drawn order, into one
  3x4 colour matrix per view (as DALI's colour twist), applied in one pass by PIL's
  ``Image.convert("RGB", matrix)``; see :func:`jitter_matrix`. The parameter draw is the same,
  so a seed gives the same :class:`PhotometricParams` with either kernel. Select it with
  ``make_photometrics("mocov2", jitter_kernel="fast")`` or the string form ``"mocov2:fast"``
  (accepted wherever a preset name is, e.g. ``ObjectCropDataset(..., photometrics=
  "mocov2:fast")``).

  Against the exact kernels (0..255 levels; tests/engine/test_fast_jitter.py, 200 draws over
  10 images): without hue and where nothing clips between steps, max 2 (MoCo-v2 ranges) / 3
  (SimCLR ranges), mean |diff| 0.33, unbiased (PIL's per-step truncation is folded into the
  offset). Where the exact kernels clip between steps (e.g. brightness 1.4 on highlights, then
  contrast) single views can differ more: over all draws mean 0.57 / 1.36, max 50 / 149. Hue
  is a rotation about the grey axis, a linear stand-in for the piecewise-linear HSV shift:
  hue alone, mean 4.3, max 60 over 10 images x 20 hue values in [-0.1, 0.1] (no shift at all:
  mean 5.5); the full MoCo-v2 jitter with hue, mean 3.8. Time per 224 px view (jitter applied,
  MoCo-v2 ranges, one core): 0.3 ms instead of 2.5 ms (0.55 ms without the HSV hue round trip).

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
    "JITTER_KERNELS",
    "PRESETS",
    "Photometric",
    "PhotometricParams",
    "PhotometricSet",
    "apply_jitter_exact",
    "apply_jitter_fast",
    "jitter_matrix",
    "make_photometrics",
    "parse_photometrics",
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

    ``jitter_kernel`` picks the colour-jitter kernel: ``"exact"`` (torchvision's PIL kernels,
    one after another, as lightly) or ``"fast"`` (the four adjustments fused into one 3x4 colour
    matrix, see :func:`jitter_matrix`). Both draw the same parameters from the same generator.

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
    jitter_kernel: str = "exact"

    def __post_init__(self) -> None:
        if self.jitter_kernel not in JITTER_KERNELS:
            raise ValueError(
                f"unknown jitter kernel {self.jitter_kernel!r}; choose one of "
                f"{', '.join(JITTER_KERNELS)}"
            )

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
            if self.jitter_kernel == "fast":
                img = apply_jitter_fast(img, p)
            else:
                img = apply_jitter_exact(img, p)
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


def apply_jitter_exact(img: Image.Image, p: PhotometricParams) -> Image.Image:
    """Colour jitter with torchvision's PIL kernels, one after another in ``p.jitter_order``
    (each rounds down to 8 bits and clips; hue is a round trip through PIL's 8-bit HSV)."""
    if p.jitter_order is None:
        return img
    for op in p.jitter_order:
        if op == 0 and p.brightness != 1.0:
            img = TF.adjust_brightness(img, p.brightness)
        elif op == 1 and p.contrast != 1.0:
            img = TF.adjust_contrast(img, p.contrast)
        elif op == 2 and p.saturation != 1.0:
            img = TF.adjust_saturation(img, p.saturation)
        elif op == 3 and p.hue != 0.0:
            img = TF.adjust_hue(img, p.hue)
    return img


#: the colour-jitter kernels :class:`Photometric` takes (``jitter_kernel``)
JITTER_KERNELS = ("exact", "fast")

#: ITU-R 601 luma, the weights of PIL's ``convert("L")`` (torchvision's PIL grayscale)
_LUMA = np.array([0.299, 0.587, 0.114])
#: PIL's ``Image.blend`` (behind brightness, contrast and saturation) truncates its result to
#: 8 bits: on average half a level down per step. The fused matrix adds that expected loss to
#: its offset, so it is unbiased against the exact kernels rather than half a level per step
#: brighter.
_BLEND_TRUNCATION = 0.5


def _hue_rotation(hue: float) -> np.ndarray:
    """3x3: rotation by ``hue`` turns about the grey axis ``(1, 1, 1)`` of RGB space, in the
    sense of torchvision's hue shift (red -> yellow -> green for ``hue > 0``).

    HSV hue is the (hexagonal) angle about this axis, so the rotation approximates the HSV hue
    shift better than DALI's rotation of the I/Q plane of YIQ space (which keeps luma): against
    torchvision's ``adjust_hue``, for hue in [-0.1, 0.1], mean |diff| 4.3 levels, max 60 (YIQ:
    5.4, max 122; the best linear map fitted per hue: 4.3, max 64).
    """
    a = 2.0 * np.pi * hue
    c, s = np.cos(a), np.sin(a)
    k = 1.0 / 3.0
    r = np.sqrt(k) * s  # Rodrigues: cos I + sin [k]x + (1 - cos) k k^T, k = (1, 1, 1) / sqrt(3)
    return c * np.eye(3) + np.array([[0.0, -r, r], [r, 0.0, -r], [-r, r, 0.0]]) + (1 - c) * k


def jitter_matrix(p: PhotometricParams, mean_rgb=None) -> np.ndarray:
    """The colour jitter of ``p`` as one affine colour map: a ``(3, 4)`` matrix ``[M | t]``,
    ``rgb' = M @ rgb + t`` (0..255 scale), composed in ``p.jitter_order``.

    - brightness ``b``: ``b * x``;
    - contrast ``c``: ``c * x + (1 - c) * m``, ``m`` the mean luma of the image at that point of
      the sequence, rounded as PIL does (``int(mean + 0.5)``). The mean of an affine map of the
      pixels is the map of the mean pixel, so ``m = luma . (M @ mean_rgb + t)`` with the map
      composed so far: ``mean_rgb`` (the view's mean colour) is needed only for contrast;
    - saturation ``s``: ``s * x + (1 - s) * luma(x)``;
    - hue ``h`` (turns): rotation by ``2 pi h`` about the grey axis (:func:`_hue_rotation`);
      approximates torchvision's HSV hue shift.

    Brightness, contrast and saturation each subtract :data:`_BLEND_TRUNCATION` (PIL truncates
    every blend). Unlike the exact kernels, the map does not clip between steps.
    """
    a = np.eye(4)
    if p.jitter_order is None:
        return a[:3].copy()
    for op in p.jitter_order:
        step = np.eye(4)
        if op == 0 and p.brightness != 1.0:
            step[:3, :3] *= p.brightness
        elif op == 1 and p.contrast != 1.0:
            if mean_rgb is None:
                raise ValueError("the contrast adjustment needs the view's mean colour mean_rgb")
            mean = float(_LUMA @ (a[:3, :3] @ np.asarray(mean_rgb, dtype=np.float64) + a[:3, 3]))
            mean = float(np.floor(min(max(mean, 0.0), 255.0) + 0.5))
            step[:3, :3] *= p.contrast
            step[:3, 3] = (1.0 - p.contrast) * mean
        elif op == 2 and p.saturation != 1.0:
            s = p.saturation
            step[:3, :3] = s * np.eye(3) + (1.0 - s) * np.outer(np.ones(3), _LUMA)
        elif op == 3 and p.hue != 0.0:
            step[:3, :3] = _hue_rotation(p.hue)
        else:
            continue
        if op != 3:
            step[:3, 3] -= _BLEND_TRUNCATION
        a = step @ a
    return a[:3].copy()


def apply_jitter_fast(img: Image.Image, p: PhotometricParams) -> Image.Image:
    """Colour jitter as one 3x4 colour matrix (:func:`jitter_matrix`), applied in one pass by
    PIL's ``Image.convert("RGB", matrix)`` (which rounds and saturates to 0..255).

    Images not in RGB mode take the exact kernels."""
    if p.jitter_order is None:
        return img
    if img.mode != "RGB":
        return apply_jitter_exact(img, p)
    ops = {
        0: p.brightness != 1.0, 1: p.contrast != 1.0, 2: p.saturation != 1.0, 3: p.hue != 0.0,
    }
    if not any(ops.values()):
        return img
    mean_rgb = None
    if ops[1]:  # mean colour from PIL's per-band histogram (exact, faster than ImageStat)
        hist = np.asarray(img.histogram(), dtype=np.float64).reshape(3, 256)
        mean_rgb = hist @ np.arange(256.0) / (img.width * img.height)
    m = jitter_matrix(p, mean_rgb)
    return img.convert("RGB", tuple(float(v) for v in m.ravel()))


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


def parse_photometrics(spec: str) -> tuple[str, str | None]:
    """Split a photometrics string into preset name and jitter kernel: ``"mocov2:fast"`` ->
    ``("mocov2", "fast")``, ``"mocov2"`` -> ``("mocov2", None)`` (the preset's default)."""
    name, sep, kernel = spec.partition(":")
    if not sep:
        return name, None
    if kernel not in JITTER_KERNELS:
        raise ValueError(
            f"unknown jitter kernel {kernel!r} in {spec!r}; choose one of "
            f"{', '.join(JITTER_KERNELS)}"
        )
    return name, kernel


def make_photometrics(
    spec: str | Photometric | PhotometricSet = "mocov2",
    normalize: bool = True,
    jitter_kernel: str | None = None,
) -> PhotometricSet:
    """A :class:`PhotometricSet` from a preset name, one :class:`Photometric`, or a set.

    Args:
        spec: a preset name (:data:`PRESETS`), optionally with the jitter kernel as a suffix
            (``"mocov2:fast"``); a :class:`Photometric`; or a :class:`PhotometricSet` (returned
            as is unless ``jitter_kernel`` is given).
        normalize: ImageNet normalisation (preset names only).
        jitter_kernel: ``"exact"`` (torchvision's PIL kernels, the default of every preset) or
            ``"fast"`` (one fused 3x4 colour matrix per view); ``None`` keeps the suffix of
            ``spec``, or else the kernel the photometrics already have. Applies to every view
            of the set. The random draws are the same with either kernel.
    """
    if jitter_kernel is not None and jitter_kernel not in JITTER_KERNELS:
        raise ValueError(
            f"unknown jitter kernel {jitter_kernel!r}; choose one of {', '.join(JITTER_KERNELS)}"
        )
    if isinstance(spec, PhotometricSet):
        pset = spec
    elif isinstance(spec, Photometric):
        pset = PhotometricSet("custom", (spec,), spec)
    else:
        name, suffix = parse_photometrics(spec)
        if suffix is not None and jitter_kernel is not None and suffix != jitter_kernel:
            raise ValueError(
                f"photometrics {spec!r} conflicts with jitter_kernel={jitter_kernel!r}"
            )
        jitter_kernel = jitter_kernel or suffix
        pset = _preset(name)
        if not normalize:
            pset = PhotometricSet(
                pset.name,
                tuple(replace(p, normalize=False) for p in pset.globals_),
                replace(pset.local, normalize=False),
            )
    if jitter_kernel is None:
        return pset
    base = pset.name.partition(":")[0]
    return PhotometricSet(
        base if jitter_kernel == "exact" else f"{base}:{jitter_kernel}",
        tuple(replace(p, jitter_kernel=jitter_kernel) for p in pset.globals_),
        replace(pset.local, jitter_kernel=jitter_kernel),
    )

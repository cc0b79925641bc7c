"""Pictures of what the crop policies do: proposals, windows and views, side by side."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ._random import sample_rng
from .boxes import size_mismatch
from .engine.cpu import ViewEngine
from .files import OutputKind, atomic_write
from .images import load_rgb, open_image
from .proposals.store import ProposalStore

__all__ = ["PICTURE_KIND", "crops_figure"]

_SOFTWARE = "objcrop-plugin crops_figure"
#: what ``objcrop show --out`` may replace: a PNG this function wrote (its tEXt chunk says so;
#: Pillow writes text chunks before the image data, so the first 4 KiB hold it)
PICTURE_KIND = OutputKind(
    "crops picture",
    lambda head: head.startswith(b"\x89PNG\r\n\x1a\n") and _SOFTWARE.encode() in head,
)

# view colours: distinguishable, colour-blind friendly (Okabe-Ito)
_COLOURS = [
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
    (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255),
]
_PROPOSAL = (255, 60, 60)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans where the system has it (file names in any script: Pillow's own font
    draws only Latin letters), else Pillow's default font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


#: fonts with CJK glyphs (Noto CJK, WenQuanYi, Droid Sans Fallback), for a caption DejaVu
#: Sans cannot draw
_CJK_FONTS = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "NotoSansCJK.ttc",
              "wqy-zenhei.ttc", "wqy-microhei.ttc", "DroidSansFallbackFull.ttf",
              "DroidSansFallback.ttf")
_CJK_START = 0x2E80  # CJK radicals onwards (and the scripts after them DejaVu lacks too)


def _caption(text: str, size: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
             ) -> tuple[str, ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """``(text, font)`` to draw a caption (a file name) with: ``font`` for names DejaVu Sans
    covers; a CJK font of the system for others; without one, those characters as
    ``\\uXXXX`` escapes, so the file can still be told (not a row of empty boxes)."""
    if all(ord(c) < _CJK_START for c in text):
        return text, font
    for name in _CJK_FONTS:
        try:
            return text, ImageFont.truetype(name, size)
        except OSError:
            continue
    return "".join(c if ord(c) < _CJK_START else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF
                   else f"\\U{ord(c):08x}" for c in text), font


def _fit(img: Image.Image, tile: int, tile_h: int | None = None) -> tuple[Image.Image, float]:
    scale = min(tile / img.size[0], (tile_h or tile) / img.size[1])
    size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    return img.resize(size, Image.Resampling.BILINEAR), scale


def crops_figure(
    root: str | os.PathLike[str],
    keys: Sequence[str],
    store: ProposalStore | None,
    recipes: Sequence[str] = ("scene_scene", "obj_obj_dilate"),
    out: str | os.PathLike[str] = "crops.png",
    tile: int = 168,
    seed: int = 0,
    top_k: int = 10,
    photometrics: str = "none",
    recipe_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write a PNG: per image, the image with its proposals and each recipe's views.

    Each row is one image. First column: the image with its top-``top_k`` proposals (thin red),
    and every view's crop window in that view's colour. Then, per recipe, its views (before
    photometrics unless ``photometrics`` names a preset), framed in the same colours.

    Returns:
        the path written (atomically).
    """
    engines = [ViewEngine(r, photometrics="none", **(recipe_kwargs or {}).get(r, {})) for r in recipes]
    needy = [r for r, e in zip(recipes, engines) if e.recipe.needs_proposals]
    if store is None and needy:
        raise ValueError(
            f"{', '.join(map(str, needy))} crop from proposals, but no proposal store was given "
            "(the demo's ground truth is the default for the demo data only). Fix: a store "
            "(objcrop show --proposals STORE; `objcrop proposals build` makes one), or "
            "scene_scene alone (--views scene_scene)")
    pad, head = 6, 22
    font, small = _font(14), _font(11)
    row_h = tile + 22
    big_w = int((row_h - 14) * 4 / 3)  # the annotated image gets a wider column (4:3)
    n_views = sum(len(e.recipe.views) for e in engines)
    width = pad + big_w + pad + n_views * (tile + pad) + pad * len(engines)
    height = head + len(keys) * (row_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), "image + proposals", fill=(220, 220, 220), font=font)
    x = pad + big_w + pad
    for e in engines:
        draw.text((x + 2, 4), e.recipe.name, fill=(220, 220, 220), font=font)
        x += len(e.recipe.views) * (tile + pad) + pad

    for row, key in enumerate(keys):
        y = head + row * (row_h + pad)
        opened = open_image(Path(root) / key)
        image = load_rgb(opened)
        props = store.get(key) if store is not None else None
        thumb, scale = _fit(image, big_w, row_h - 14)
        tdraw = ImageDraw.Draw(thumb)
        # boxes of another aspect ratio belong to another orientation: neither drawn nor used
        # (the recipes fall back to scene crops and count it)
        if props is not None and size_mismatch(props.image_size, image.size) is None:
            props = props.rescaled(image.size)
            order = np.argsort(-np.nan_to_num(props.scores.astype(np.float64), nan=-np.inf))
            for b in props.boxes[order[:top_k]]:
                if np.isfinite(b).all():
                    tdraw.rectangle([float(v) * scale for v in b], outline=_PROPOSAL, width=1)
        x = pad + big_w + pad
        colour_i = 0
        cells = []
        for ei, e in enumerate(engines):
            rng = sample_rng(seed, row, ei)
            windows = e.recipe(image.size, None if props is None else props.boxes,
                               None if props is None else props.scores, rng=rng, key=key,
                               boxes_size=None if props is None else props.image_size)
            pset = None if photometrics == "none" else photometrics
            crops = e.crops(image, windows)
            for w, crop in zip(windows, crops):
                colour = _COLOURS[colour_i % len(_COLOURS)]
                colour_i += 1
                tdraw.rectangle([v * scale for v in w.box], outline=colour, width=2)
                if pset is not None:
                    from .engine.photometric import make_photometrics

                    phot = make_photometrics(pset, normalize=False).for_view(0, w.local)
                    arr = phot(crop, rng).mul(255).round().byte().permute(1, 2, 0).numpy()
                    crop = Image.fromarray(arr)
                cell, _ = _fit(crop, tile - 4)
                cells.append((x, cell, colour, w))
                x += tile + pad
            x += pad
        canvas.paste(thumb, (pad, y))
        caption, caption_font = _caption(key, 11, small)
        draw.text((pad, y + thumb.size[1] + 1), caption, fill=(170, 170, 170), font=caption_font)
        for cx, cell, colour, w in cells:
            draw.rectangle([cx, y, cx + cell.size[0] + 3, y + cell.size[1] + 3], outline=colour, width=2)
            canvas.paste(cell, (cx + 2, y + 2))
            label = w.policy + (" (fallback)" if w.fallback else "")
            draw.text((cx, y + cell.size[1] + 5), label, fill=colour, font=small)

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", _SOFTWARE)
    return atomic_write(out, lambda f: canvas.save(f, format="PNG", pnginfo=info))

"""ObjectAwareViews: transforms-v2 style, image + boxes in, views out, no proposal store.

The outside oracle is torchvision: its ``CocoDetection`` reads a COCO folder written here, its
``wrap_dataset_for_transforms_v2`` turns the annotations into ``tv_tensors.BoundingBoxes`` and
calls our transform as it calls any v2 transform; its box-format conversion makes the formats.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from objcrop_plugin import NoProposalError, ObjectAwareViews

W, H = 96, 72
GREY = (128, 128, 128)
#: per image: (colour, xyxy box) of its solid rectangles on grey; the last image has none
SCENES = [
    [((255, 0, 0), (8, 8, 40, 40))],
    [((0, 200, 0), (50, 10, 90, 60)), ((0, 0, 255), (5, 30, 35, 70))],
    [((255, 255, 0), (20, 20, 76, 52))],
    [((0, 255, 255), (2, 2, 30, 24)), ((255, 0, 255), (60, 40, 94, 70))],
    [],
]
EMPTY = len(SCENES) - 1


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO-format folder (PNG images, instances JSON) of the :data:`SCENES`."""
    pytest.importorskip("pycocotools", reason="torchvision's CocoDetection needs pycocotools")
    root = tmp_path_factory.mktemp("coco")
    images, annotations = [], []
    for i, scene in enumerate(SCENES):
        image = Image.new("RGB", (W, H), GREY)
        for colour, box in scene:
            image.paste(colour, box)
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})
        image.save(root / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": W, "height": H})
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "rectangle"}]}))
    return root, ann


def _dataset(coco, transforms):
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    root, ann = coco
    ds = CocoDetection(str(root), str(ann), transforms=transforms)
    return wrap_dataset_for_transforms_v2(ds, target_keys=("image_id", "boxes", "labels"))


def _image_and_boxes(i: int = 1):
    image = Image.new("RGB", (W, H), GREY)
    for colour, box in SCENES[i]:
        image.paste(colour, box)
    boxes = tv_tensors.BoundingBoxes([b for _, b in SCENES[i]], format="XYXY", canvas_size=(H, W))
    return image, boxes


def _colour(view: torch.Tensor) -> np.ndarray:
    return view.mean(dim=(1, 2)).numpy() * 255.0


def test_coco_detection_views_are_cut_from_the_annotated_objects(coco):
    transform = ObjectAwareViews("obj_obj", photometrics="none", normalize=False, size=16)
    dataset = _dataset(coco, transform)
    for i, scene in enumerate(SCENES[:EMPTY]):
        colours = np.array([c for c, _ in scene] + [GREY], dtype=float)
        for _ in range(4):
            views = dataset[i]
            assert isinstance(views, list) and len(views) == 2
            assert all(v.shape == (3, 16, 16) and v.dtype == torch.float32 for v in views)
            nearest = []
            for v in views:
                dist = np.abs(colours - _colour(v)).max(axis=1)
                nearest.append(int(dist.argmin()))
                # only the object's pixels (the resampling filter may touch a border pixel)
                assert dist.min() < 12, (i, _colour(v), colours)
            assert nearest[0] == nearest[1] < len(scene)  # one object, both views


def test_box_formats_and_canvas_sizes_give_the_same_windows():
    image, xyxy = _image_and_boxes(3)
    transform = ObjectAwareViews("obj_obj_dilate", size=16)
    expected = [w.box for w in transform.windows(image, xyxy, rng=np.random.default_rng(5))]
    for fmt in ("XYWH", "CXCYWH"):
        boxes = F.convert_bounding_box_format(xyxy, new_format=fmt)
        assert boxes.format.name == fmt
        got = transform.windows(image, {"boxes": boxes}, rng=np.random.default_rng(5))
        np.testing.assert_allclose([w.box for w in got], expected, atol=1e-9)
    # boxes of the same image at twice the resolution are rescaled to the image's pixels
    big = tv_tensors.BoundingBoxes(xyxy * 2, format="XYXY", canvas_size=(2 * H, 2 * W))
    got = transform.windows(image, big, rng=np.random.default_rng(5))
    np.testing.assert_allclose([w.box for w in got], expected, atol=1e-9)
    # boxes of another aspect ratio would land elsewhere: an error naming both sizes
    other = tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(W, H))
    with pytest.raises(ValueError, match="72x96 canvas but the image is 96x72"):
        transform(image, other)


def test_pil_uint8_and_float_images_give_the_same_views():
    image, boxes = _image_and_boxes(1)
    as_uint8 = F.pil_to_tensor(image)
    inputs = {
        "pil": image,
        "uint8": as_uint8,
        "image": tv_tensors.Image(as_uint8),
        "float": as_uint8.float() / 255.0,
    }
    transform = ObjectAwareViews("obj_obj_dilate", photometrics="mocov2", size=16)
    views = {k: transform(x, {"boxes": boxes}, rng=np.random.default_rng(11))
             for k, x in inputs.items()}
    tol = 1.0 / 255.0 / 0.224  # one grey level after ImageNet normalisation
    for name, got in views.items():
        assert len(got) == 2, name
        for a, b in zip(got, views["pil"]):
            torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=name)


def test_no_boxes_is_an_error_naming_the_fix_unless_scene_fallback_is_allowed(coco):
    strict = ObjectAwareViews("obj_obj_dilate", size=16)
    image, boxes = _image_and_boxes(0)
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(H, W))
    with pytest.raises(NoProposalError, match="allow_scene_fallback=True"):
        _dataset(coco, strict)[EMPTY]  # a COCO image without annotations: no "boxes" key
    with pytest.raises(NoProposalError, match="image_id=5"):
        _dataset(coco, strict)[EMPTY]
    with pytest.raises(NoProposalError, match="empty"):
        strict(image, {"boxes": empty})
    with pytest.raises(NoProposalError, match="BoundingBoxes"):
        strict(image)
    assert strict.recipe.fallbacks.fallbacks == 0
    # a plain tensor has no format: refused, unless box_format says it
    with pytest.raises(TypeError, match="box_format='XYXY'"):
        strict(image, {"boxes": boxes.as_subclass(torch.Tensor)})
    plain = ObjectAwareViews("obj_obj_dilate", size=16, box_format="xyxy")
    assert len(plain(image, {"boxes": boxes.as_subclass(torch.Tensor)})) == 2

    lenient = ObjectAwareViews("obj_obj_dilate", size=16, allow_scene_fallback=True)
    views = _dataset(coco, lenient)[EMPTY]
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2
    lenient(image, empty)
    lenient(image, boxes)  # has a box: no fallback
    counts = lenient.recipe.fallbacks.as_dict()
    assert counts["samples"] == 3 and counts["unusable"] == 2
    assert lenient.windows(image, empty, rng=np.random.default_rng(0))[0].fallback


class _Samples(torch.utils.data.Dataset):
    """The COCO dataset's items at fixed indices."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def _batches(coco, transform):
    # batch k comes from worker k % 2: batches 0 and 1 hold the same image, 2 and 3 the empty one
    data = _Samples(_dataset(coco, transform), [0, 0, 0, 0, EMPTY, EMPTY, EMPTY, EMPTY])
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    return list(loader)


def test_dataloader_workers_draw_their_own_streams_and_share_the_fallback_count(coco):
    # solid objects look alike in every window: the photometrics show the stream
    transform = ObjectAwareViews("obj_obj", photometrics="mocov2", size=16,
                                 allow_scene_fallback=True)
    torch.manual_seed(0)
    batches = _batches(coco, transform)
    assert len(batches) == 4
    for views in batches:
        assert [tuple(v.shape) for v in views] == [(2, 3, 16, 16)] * 2
    (a, _), (b, _) = batches[0], batches[1]
    assert not torch.equal(a[0], b[0])  # same image, first draw of each worker
    assert not torch.equal(a[0], a[1])  # the stream moves on within a worker
    assert transform.recipe.fallbacks.as_dict()["unusable"] == 4  # counted in the workers
    torch.manual_seed(0)
    again = _batches(coco, transform)
    assert all(torch.equal(x, y) for p, q in zip(batches, again) for x, y in zip(p, q))


def test_called_like_lightlys_multi_view_transform_v2(coco):
    transforms = pytest.importorskip("lightly.transforms")
    if not hasattr(transforms, "MultiViewTransformV2"):
        pytest.skip("this lightly has no MultiViewTransformV2 (needs torchvision transforms v2)")
    from torchvision.transforms import v2 as T

    view = T.Compose([T.RandomResizedCrop(16), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    theirs = transforms.MultiViewTransformV2([view, view])
    ours = ObjectAwareViews("obj_obj_dilate", size=16)
    params = lambda f: [p.kind for p in inspect.signature(f).parameters.values()]  # noqa: E731
    assert inspect.Parameter.VAR_POSITIONAL in params(theirs.__call__)
    assert params(ours.__call__)[0] is inspect.Parameter.VAR_POSITIONAL

    their_views = _dataset(coco, theirs)[1]
    our_views = _dataset(coco, ours)[1]
    assert len(their_views) == len(our_views) == 2
    # lightly's views are transformed (image, target) pairs, boxes included; ours are tensors
    assert all(isinstance(v, tuple) and isinstance(v[1]["boxes"], tv_tensors.BoundingBoxes)
               for v in their_views)
    assert all(type(v) is torch.Tensor and v.shape == (3, 16, 16) for v in our_views)

    # a DetCon-style sample (image, target with boxes, masks and labels): masks are ignored
    image, boxes = _image_and_boxes(1)
    masks = tv_tensors.Mask(torch.zeros(2, H, W, dtype=torch.uint8))
    sample = (F.pil_to_tensor(image), {"boxes": boxes, "masks": masks, "labels": torch.tensor([1, 2])})
    assert len(ours(*sample)) == 2


def test_a_16_bit_pil_image_is_scaled_like_the_package_decodes_it():
    """A 16-bit grey image handed in by a caller is scaled from its bit depth (as every decode
    of the package does), not clipped to white by PIL's convert."""
    arr = np.full((32, 32), 3000, np.uint16)  # 12-bit data: 3000 / 4095 * 255 = 186.8
    image = Image.fromarray(arr)
    assert image.mode.startswith("I;16")
    transform = ObjectAwareViews("obj_obj", photometrics="none", normalize=False, size=16)
    views = transform(image, tv_tensors.BoundingBoxes([[4, 4, 28, 28]], format="XYXY",
                                                     canvas_size=(32, 32)))
    assert all(abs(float(v.mean()) * 255.0 - 187.0) < 1.5 for v in views)

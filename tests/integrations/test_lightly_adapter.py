"""The lightly adapter: lightly's batch format, workers, DDP ranks, fallbacks, lightly's examples.

Every test but the import guard needs lightly and is skipped cleanly without it (the ``demo``
fixture calls ``pytest.importorskip``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from objcrop_plugin.proposals import ProposalStore

NEEDS_LIGHTLY = 'the lightly adapter needs lightly: pip install "objcrop-plugin[lightly]"'

try:
    import lightly  # noqa: F401
except ImportError:  # the demo fixture skips every test that needs it
    pass
else:
    import torchvision
    from lightly.data import LightlyDataset, MultiViewCollate
    from lightly.loss import DINOLoss, NTXentLoss
    from lightly.models.modules import DINOProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform, SimCLRTransform
    from lightly.utils.scheduler import cosine_schedule
    from torch import nn

    from objcrop_plugin.lightly import ObjectAwareCollate, ObjectAwareDataset


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def demo(demo_data):
    pytest.importorskip("lightly", reason=NEEDS_LIGHTLY)
    return demo_data(n_images=16, size=(160, 120), seed=0)


@pytest.fixture(scope="module")
def with_extras(demo, tmp_path_factory):
    """The demo images plus 4 copies under names the proposal store does not know."""
    root = tmp_path_factory.mktemp("extras")
    shutil.copytree(demo.image_dir, root / "images")
    for i in range(4):
        shutil.copy(demo.image_dir / f"00000{i}.jpg", root / "images" / f"extra_{i}.jpg")
    return root


def _loader(dataset, collate_fn=None, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return torch.utils.data.DataLoader(dataset, collate_fn=collate_fn, **kwargs)


def _first_views(loader) -> list[torch.Tensor]:
    return [torch.cat(batch[0]) for batch in loader]


def _assert_same_format(ours, ref) -> None:
    """``ours`` has the types, lengths, dtypes and shapes of ``ref`` (MultiViewCollate's)."""
    assert type(ours) is type(ref) is tuple and len(ours) == len(ref) == 3
    (views, targets, names), (rviews, rtargets, rnames) = ours, ref
    assert type(views) is type(rviews) is list and len(views) == len(rviews)
    for v, r in zip(views, rviews):
        assert type(v) is type(r) is torch.Tensor
        assert v.dtype == r.dtype == torch.float32 and v.shape == r.shape
        assert torch.isfinite(v).all()
    assert type(targets) is type(rtargets) is torch.Tensor
    assert targets.dtype == rtargets.dtype == torch.long and targets.shape == rtargets.shape
    assert torch.equal(targets, rtargets)
    assert type(names) is type(rnames) is list and names == rnames
    assert all(type(n) is str for n in names)


# --------------------------------------------------------------------------- import guard

def test_import_guard_names_the_extra():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["lightly"] = None  # as if lightly were not installed
        import objcrop_plugin, objcrop_plugin.integrations  # the core never needs lightly
        try:
            import objcrop_plugin.lightly
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        else:
            print("NO-ERROR")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR:" in out.stdout, out.stdout
    assert 'pip install "objcrop-plugin[lightly]"' in out.stdout
    assert "lightly" in out.stdout.split("IMPORT-ERROR:", 1)[1]


# --------------------------------------------------------------------------- batch format

def test_collate_output_is_multiview_collates(demo):
    batch = [LightlyDataset(str(demo.root))[i] for i in range(4)]
    ours = ObjectAwareCollate(demo.proposals_path, size=64)(batch)
    reference = LightlyDataset(str(demo.root), transform=SimCLRTransform(input_size=64))
    ref = MultiViewCollate()([reference[i] for i in range(4)])
    _assert_same_format(ours, ref)
    assert ours[2] == demo.keys[:4]


def test_collate_multi_crop_matches_dino_transform_shapes(demo):
    dataset = LightlyDataset(str(demo.root))
    collate = ObjectAwareCollate(
        demo.proposals_path, views="multi_crop", global_size=64, local_size=32, n_local=2
    )
    ours = next(iter(_loader(dataset, collate)))
    transform = DINOTransform(global_crop_size=64, local_crop_size=32, n_local_views=2)
    reference = LightlyDataset(str(demo.root), transform=transform)
    ref = next(iter(_loader(reference, MultiViewCollate())))
    _assert_same_format(ours, ref)
    assert [tuple(v.shape) for v in ours[0]] == [(4, 3, 64, 64)] * 2 + [(4, 3, 32, 32)] * 2


def test_dataset_items_are_lightly_datasets(demo):
    ours = ObjectAwareDataset(demo.root, demo.proposals_path, size=64)
    ref = LightlyDataset(str(demo.root), transform=SimCLRTransform(input_size=64))
    assert len(ours) == len(ref) == 16
    assert ours.get_filenames() == ref.get_filenames()
    (views, target, name), (rviews, rtarget, rname) = ours[3], ref[3]
    assert type(views) is type(rviews) is list
    assert [(v.dtype, v.shape) for v in views] == [(r.dtype, r.shape) for r in rviews]
    assert (type(target), target, type(name), name) == (type(rtarget), rtarget, type(rname), rname)
    # composes with lightly's collate and with the default one, as LightlyDataset does
    _assert_same_format(
        next(iter(_loader(ours, MultiViewCollate()))), next(iter(_loader(ref, MultiViewCollate())))
    )
    default, rdefault = next(iter(_loader(ours))), next(iter(_loader(ref)))
    assert [v.shape for v in default[0]] == [v.shape for v in rdefault[0]]
    assert torch.equal(default[1], rdefault[1]) and default[2] == rdefault[2]


def test_dataset_refuses_a_store_built_over_another_folder(demo, tmp_path):
    """None of the folder's images in the store: every view would be a scene crop (a
    baseline run, silently); refused, naming the keys on both sides and the fix."""
    _jpeg(tmp_path / "photos" / "a.jpg")
    _jpeg(tmp_path / "photos" / "b.jpg")
    with pytest.raises(ValueError, match=r"none of the 2 images checked .* 'a\.jpg' .* keys "
                                         r"look like .*Fix: pass the folder the store was built"):
        ObjectAwareDataset(tmp_path / "photos", demo.proposals_path, size=32)
    assert len(ObjectAwareDataset(tmp_path / "photos", None, views="scene_scene", size=32)) == 2


def _jpeg(path, color=(90, 120, 200), size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.mark.parametrize("layout", ["flat", "classes"])
def test_dataset_filenames_and_targets_match_lightly(demo, tmp_path, layout, caplog):
    if layout == "flat":
        files = ["b.jpg", "a.png", "c.JPEG", "anim.gif", "notes.txt"]  # lightly skips gif, txt
    else:
        # ImageFolder: root-level files ignored; nested folders walked in os.walk order, where
        # dog/b/ comes before dog/b-c/ (a plain sort of the paths puts b-c/ first)
        files = ["stray.jpg", "dog/b-c/x.jpg", "dog/b/y.jpg", "dog/a.jpg", "cat/z.png", "cat/k.jpg"]
    for name in files:
        if name.endswith(".txt"):
            (tmp_path / name).write_text("not an image")
        else:
            _jpeg(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        ours = ObjectAwareDataset(tmp_path, None, views="scene_scene", size=32)
    ref = LightlyDataset(str(tmp_path))
    assert len(ours) == len(ref)
    # lightly's class folders leave out the folder's own images: said, with the fix
    left_out = "1 image(s) directly in the folder (stray.jpg) are not in the dataset"
    assert (left_out in caplog.text) == (layout == "classes"), caplog.text
    assert ours.get_filenames() == ref.get_filenames()
    assert [ours[i][1:] for i in range(len(ours))] == [ref[i][1:] for i in range(len(ref))]
    if layout == "flat":
        assert {ours[i][1] for i in range(len(ours))} == {0}
    else:
        assert [ours[i][1:] for i in range(len(ours))][:2] == [(0, "cat/k.jpg"), (0, "cat/z.png")]
        assert ours.classes == ["cat", "dog"]


def test_collate_refuses_transformed_samples_clearly(demo):
    dataset = LightlyDataset(str(demo.root), transform=torchvision.transforms.ToTensor())
    with pytest.raises(TypeError, match="transform=None"):
        ObjectAwareCollate(demo.proposals_path)([dataset[0]])


def _prefixed(filename: str) -> str:
    return "images/" + filename


def test_keys_from_key_fn_or_root(demo):
    images_only = LightlyDataset(str(demo.image_dir))  # filenames "000000.jpg", keys "images/..."
    batch = [images_only[i] for i in range(4)]
    plain = ObjectAwareCollate(demo.proposals_path, size=32)
    plain(batch)
    assert plain.recipe.fallbacks.as_dict()["missing"] == 4
    mapped = ObjectAwareCollate(demo.proposals_path, size=32, key_fn=_prefixed)
    assert mapped(batch)[2] == [f"{i:06d}.jpg" for i in range(4)]  # filenames unchanged
    assert mapped.recipe.fallbacks.as_dict() == {"samples": 4, "missing": 0, "unusable": 0, "mismatched": 0}
    absolute = [(img, t, str(demo.root / k)) for (img, t, _), k in zip(batch, demo.keys)]
    rooted = ObjectAwareCollate(demo.proposals_path, size=32, root=demo.root)
    rooted(absolute)
    assert rooted.recipe.fallbacks.fallbacks == 0


def test_collate_refuses_a_store_with_none_of_the_images_it_sees(demo):
    """Filenames that are not the store's keys (here: a LightlyDataset over the images'
    subfolder, without key_fn) make every view a scene crop: after 64 images without an entry
    the collate function says so, naming a key of each side; one match ends the check."""
    images_only = LightlyDataset(str(demo.image_dir))
    batch = [images_only[i] for i in range(4)]
    plain = ObjectAwareCollate(demo.proposals_path, views="obj_obj", size=16)
    for _ in range(ObjectAwareCollate.KEY_PROBE // 4 - 1):
        plain(batch)  # scene crops so far, counted as fallbacks
    with pytest.raises(ValueError, match=r"none of the 64 images checked in the batches so far "
                                         r".* '000000\.jpg' .* keys look like 'images/.*Fix: "):
        plain(batch)
    mapped = ObjectAwareCollate(demo.proposals_path, views="obj_obj", size=16, key_fn=_prefixed)
    for _ in range(ObjectAwareCollate.KEY_PROBE // 4 + 1):
        mapped(batch)
    matched_once = ObjectAwareCollate(demo.proposals_path, views="obj_obj", size=16)
    matched_once([LightlyDataset(str(demo.root))[0]])
    for _ in range(ObjectAwareCollate.KEY_PROBE // 4 + 1):
        matched_once(batch)  # a store covering only some images is the user's choice
    assert matched_once.recipe.fallbacks.as_dict()["missing"] == ObjectAwareCollate.KEY_PROBE + 4


def test_exif_rotated_images_are_cropped_upright(tmp_path):
    """lightly's loader keeps the EXIF tag without rotating; boxes refer to the upright image."""
    pytest.importorskip("lightly", reason=NEEDS_LIGHTLY)
    upright = Image.new("RGB", (120, 160), (0, 0, 0))
    box = (20, 100, 80, 150)
    upright.paste((255, 0, 0), box)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown after a 270-degree rotation
    folder = tmp_path / "photos"
    folder.mkdir()
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rot.jpg", quality=95, exif=exif)
    store = tmp_path / "p.objcrop"
    ProposalStore.write(store, [("rot.jpg", [box], [1.0], (120, 160))])

    crop = {"views": "obj_obj", "scale": (1.0, 1.0), "ratio": (0.1, 10.0), "size": 16}
    sample = LightlyDataset(str(folder))[0]
    assert sample[0].size == (160, 120)  # as stored, not upright
    views, _, _ = ObjectAwareCollate(store, photometrics="none", **crop)([sample])
    item_views, _, _ = ObjectAwareDataset(folder, store, photometrics="none", **crop)[0]
    for v in [*views, *(v[None] for v in item_views)]:
        red, green = v[:, 0].mean().item(), v[:, 1].mean().item()
        assert red > 1.5 and green < -1.5  # ImageNet-normalised pure red: (2.25, -2.04)


def test_collate_pickles_with_store_by_path(demo):
    collate = ObjectAwareCollate(demo.proposals_path, size=32)
    payload = pickle.dumps(collate)
    assert os.fspath(demo.proposals_path).encode() in payload
    clone = pickle.loads(payload)
    views, targets, names = clone([LightlyDataset(str(demo.root))[0]])
    assert [tuple(v.shape) for v in views] == [(1, 3, 32, 32)] * 2 and names == [demo.keys[0]]


# --------------------------------------------------------------------------- workers, ranks

@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_fork_and_spawn_count_fallbacks_in_main(with_extras, demo, context):
    if context not in torch.multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} start method on this platform")
    collate = ObjectAwareCollate(demo.proposals_path, size=32)
    dataset = LightlyDataset(str(with_extras))
    loader = _loader(dataset, collate, num_workers=2, multiprocessing_context=context)
    names = []
    for views, targets, batch_names in loader:
        assert [tuple(v.shape) for v in views] == [(len(batch_names), 3, 32, 32)] * 2
        assert targets.dtype == torch.long
        names += batch_names
    assert sorted(names) == sorted(dataset.get_filenames()) and len(names) == 20
    # the 4 extra files are not in the store: counted by the workers, seen here
    assert collate.recipe.fallbacks.as_dict() == {"samples": 20, "missing": 4, "unusable": 0, "mismatched": 0}


def test_two_workers_draw_different_crops_of_the_same_image(demo):
    same_image = torch.utils.data.Subset(LightlyDataset(str(demo.root)), [0] * 8)
    collate = ObjectAwareCollate(demo.proposals_path, size=32)
    loader = _loader(same_image, collate, num_workers=2, multiprocessing_context="fork")
    first, second = _first_views(loader)  # batch 0 from worker 0, batch 1 from worker 1
    for i in range(first.shape[0]):
        assert not torch.equal(first[i], second[i])


def test_crops_follow_torch_seed_and_ddp_rank(demo, monkeypatch):
    dataset = LightlyDataset(str(demo.root), filenames=demo.keys[:8])
    collate = ObjectAwareCollate(demo.proposals_path, size=32)

    def run(torch_seed: int, rank: str) -> torch.Tensor:
        monkeypatch.setenv("RANK", rank)
        torch.manual_seed(torch_seed)
        loader = _loader(dataset, collate, num_workers=2, multiprocessing_context="fork")
        return torch.cat(_first_views(loader))

    base = run(1, "0")
    assert torch.equal(base, run(1, "0"))  # reproducible
    assert not torch.equal(base, run(2, "0"))  # another epoch / seed: other crops
    other_rank = run(1, "1")
    assert all(not torch.equal(a, b) for a, b in zip(base, other_rank))


def test_collate_crops_change_every_epoch_in_the_main_process_and_persistent_workers(demo):
    dataset = LightlyDataset(str(demo.root), filenames=demo.keys[:8])
    collate = ObjectAwareCollate(demo.proposals_path, size=32)
    for kwargs in ({"num_workers": 0}, {"num_workers": 2, "persistent_workers": True}):
        context = "fork" if kwargs["num_workers"] else None
        loader = _loader(dataset, collate, multiprocessing_context=context, **kwargs)
        first, second = torch.cat(_first_views(loader)), torch.cat(_first_views(loader))
        assert not torch.equal(first, second), kwargs


@pytest.mark.parametrize(
    "kwargs", [{"num_workers": 0}, {"num_workers": 2, "persistent_workers": True}]
)
def test_dataset_crops_change_every_epoch_without_seed(demo, kwargs):
    # photometrics off: the views then differ only where the crop windows differ
    dataset = ObjectAwareDataset(demo.root, demo.proposals_path, filenames=demo.keys[:8], size=32,
                                 photometrics="none")
    context = "fork" if kwargs["num_workers"] else None
    loader = _loader(dataset, multiprocessing_context=context, **kwargs)
    first, second = torch.cat(_first_views(loader)), torch.cat(_first_views(loader))
    assert not torch.equal(first, second)


def test_dataset_crops_differ_across_ranks(demo, monkeypatch):
    dataset = ObjectAwareDataset(demo.root, demo.proposals_path, seed=0, size=32)
    monkeypatch.setenv("RANK", "0")
    rank0 = torch.cat(dataset[0][0])
    assert torch.equal(rank0, torch.cat(dataset[0][0]))
    monkeypatch.setenv("RANK", "1")
    assert not torch.equal(rank0, torch.cat(dataset[0][0]))


# --------------------------------------------------------------------------- lightly's examples
# The training loops of lightly's examples/pytorch/simclr.py and dino.py, unchanged but for the
# dataset/collate line (and sizes: 8 images, batch 4, 64/32 px, one epoch = two steps).

def _example_loader(demo, path: str, **recipe):
    if path == "collate":
        dataset = LightlyDataset(str(demo.root), filenames=demo.keys[:8])
        collate_fn = ObjectAwareCollate(demo.proposals_path, **recipe)
    else:
        dataset = ObjectAwareDataset(
            demo.root, demo.proposals_path, filenames=demo.keys[:8], **recipe
        )
        collate_fn = None  # lightly's examples use the default collate with a dataset transform
    return torch.utils.data.DataLoader(
        dataset, batch_size=4, shuffle=True, drop_last=True, num_workers=0, collate_fn=collate_fn
    )


def _params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", ["collate", "dataset"])
def test_lightly_simclr_example_runs_unchanged(demo, path):
    torch.manual_seed(0)

    class SimCLR(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = SimCLRProjectionHead(512, 512, 128)

        def forward(self, x):
            x = self.backbone(x).flatten(start_dim=1)
            z = self.projection_head(x)
            return z

    resnet = torchvision.models.resnet18()
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    model = SimCLR(backbone)

    device = "cpu"
    model.to(device)

    dataloader = _example_loader(demo, path, size=64)  # the one changed line

    criterion = NTXentLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

    before, steps = _params(model), 0
    for _epoch in range(1):
        total_loss = 0
        for batch in dataloader:
            x0, x1 = batch[0]
            x0 = x0.to(device)
            x1 = x1.to(device)
            z0 = model(x0)
            z1 = model(x1)
            loss = criterion(z0, z1)
            total_loss += loss.detach()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        avg_loss = total_loss / len(dataloader)
    assert steps == 2 and math.isfinite(float(avg_loss))
    assert not torch.equal(before, _params(model))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # lightly's DINO head
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", ["collate", "dataset"])
def test_lightly_dino_example_runs_unchanged(demo, path):
    torch.manual_seed(0)

    class DINO(torch.nn.Module):
        def __init__(self, backbone, input_dim):
            super().__init__()
            self.student_backbone = backbone
            self.student_head = DINOProjectionHead(input_dim, 512, 64, 2048, freeze_last_layer=1)
            self.teacher_backbone = copy.deepcopy(backbone)
            self.teacher_head = DINOProjectionHead(input_dim, 512, 64, 2048)
            deactivate_requires_grad(self.teacher_backbone)
            deactivate_requires_grad(self.teacher_head)

        def forward(self, x):
            y = self.student_backbone(x).flatten(start_dim=1)
            z = self.student_head(y)
            return z

        def forward_teacher(self, x):
            y = self.teacher_backbone(x).flatten(start_dim=1)
            z = self.teacher_head(y)
            return z

    resnet = torchvision.models.resnet18()
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    input_dim = 512
    model = DINO(backbone, input_dim)

    device = "cpu"
    model.to(device)

    # the one changed line: object-aware multi-crop instead of DINOTransform()
    dataloader = _example_loader(
        demo, path, views="multi_crop", global_size=64, local_size=32, n_local=2
    )

    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)
    criterion = criterion.to(device)

    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)

    epochs = 1
    before, steps = _params(model.student_backbone), 0
    for epoch in range(epochs):
        total_loss = 0
        momentum_val = cosine_schedule(epoch, epochs, 0.996, 1)
        for batch in dataloader:
            views = batch[0]
            update_momentum(model.student_backbone, model.teacher_backbone, m=momentum_val)
            update_momentum(model.student_head, model.teacher_head, m=momentum_val)
            views = [view.to(device) for view in views]
            global_views = views[:2]
            teacher_out = [model.forward_teacher(view) for view in global_views]
            student_out = [model.forward(view) for view in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
            total_loss += loss.detach()
            loss.backward()
            model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        avg_loss = total_loss / len(dataloader)
    assert steps == 2 and math.isfinite(float(avg_loss))
    assert [tuple(v.shape) for v in views] == [(4, 3, 64, 64)] * 2 + [(4, 3, 32, 32)] * 2
    assert not torch.equal(before, _params(model.student_backbone))
    assert np.isfinite(_params(model.teacher_backbone).numpy()).all()


# ---------------------------------------------------------------- unreadable images

def _with_corrupt(demo, tmp_path, bad=(2,)):
    root = tmp_path / "data"
    shutil.copytree(demo.image_dir, root)
    for i in bad:
        path = root / f"{i:06d}.jpg"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    store = tmp_path / "p.objcrop"
    ProposalStore.write(store, [(r.key.split("/", 1)[1], r.boxes, r.scores, r.image_size)
                                for r in ProposalStore(demo.proposals_path).records()])
    return root, store


def test_dataset_skips_a_corrupt_image_with_lightlys_filenames(demo, tmp_path, caplog):
    root, store = _with_corrupt(demo, tmp_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in root.iterdir())
    dataset = ObjectAwareDataset(root, store, size=32, seed=0, max_failure_rate=0.1)
    with caplog.at_level("WARNING", logger="objcrop_plugin"):
        views, target, filename = dataset[2]
    assert filename == "000003.jpg" and len(views) == 2  # the next readable image
    assert dataset.bad.count == 1 and "000002.jpg" in caplog.text
    loader = _loader(dataset, MultiViewCollate(), num_workers=2, multiprocessing_context="fork")
    assert all(tuple(v.shape[1:]) == (3, 32, 32) for batch in loader for v in batch[0])
    assert dataset.bad.count == 1 and dataset.bad.indices() == [2]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in root.iterdir()) == before


def test_collate_replaces_an_undecodable_lazy_image_by_the_next_item(demo, tmp_path, caplog):
    from objcrop_plugin.stats import TooManyBadImagesError
    root, store = _with_corrupt(demo, tmp_path, bad=())
    names = [f"{i:06d}.jpg" for i in range(4)]
    batch = [(Image.open(root / n), 0, n) for n in names]  # lazily opened: decoded by the collate
    strict_batch = [(Image.open(root / n), 0, n) for n in names]
    data = (root / names[1]).read_bytes()
    (root / names[1]).write_bytes(data[: len(data) // 2])  # truncated after the header was read
    collate = ObjectAwareCollate(store, size=32, max_failure_rate=0.5)
    with caplog.at_level("WARNING", logger="objcrop_plugin"):
        views, targets, filenames = collate(batch)
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2
    assert filenames == [names[0], names[2], names[2], names[3]]
    assert torch.equal(views[0][1], views[0][2])
    assert collate.bad.count == 1 and "000001.jpg" in caplog.text
    strict = ObjectAwareCollate(store, size=32, max_failure_rate=0.0)
    with pytest.raises(TooManyBadImagesError, match="000001.jpg"):
        strict(strict_batch)

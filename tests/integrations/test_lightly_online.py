"""Online proposals for lightly runs trained with a Lightning Trainer
(:func:`objcrop_plugin.lightly.online_proposals`): lightly's SimCLR parts on a timm backbone,
boxes refreshed from it, checkpointed and resumed."""

from __future__ import annotations

import pytest
import torch

NEEDS = 'the lightly adapter needs lightly: pip install "objcrop-plugin[lightly]"'
pytest.importorskip("lightly", reason=NEEDS)
pytest.importorskip("cv2", reason="the heatmap generator needs OpenCV (proposals extra)")

import pytorch_lightning as pl  # noqa: E402
import timm  # noqa: E402
from lightly.loss import NTXentLoss  # noqa: E402
from lightly.models.modules import SimCLRProjectionHead  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

from objcrop_plugin.lightly import ObjectAwareDataset, online_proposals  # noqa: E402
from objcrop_plugin.proposals import ProposalStore  # noqa: E402


class SimCLR(pl.LightningModule):
    """lightly's SimCLR example as a LightningModule, on a timm backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
        self.projection_head = SimCLRProjectionHead(self.backbone.num_features, 32, 16)
        self.criterion = NTXentLoss()
        self.seen: dict[int, set[str]] = {}  # epoch -> the stores its items were cut from

    def training_step(self, batch, batch_idx):
        (x0, x1), _, names = batch
        self.seen.setdefault(self.current_epoch, set()).update(n.split("@")[1] for n in names)
        z0 = self.projection_head(self.backbone(x0))
        z1 = self.projection_head(self.backbone(x1))
        return self.criterion(z0, z1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


class Recording(ObjectAwareDataset):
    """Items name the store they were cut from (``key@store``), in whichever process."""

    def __getitem__(self, index):
        views, target, name = super().__getitem__(index)
        store = self.source.store
        return views, target, f"{name}@{'none' if store is None else store.path.name}"


ONLINE = {"warmup_epochs": 1, "every_epochs": 1, "params": {"scale": 2}}


def _run(demo, folder, epochs, ckpt_path=None, proposals=ONLINE, checkpoint=None):
    torch.manual_seed(0)
    dataset = Recording(demo.root, "online", size=64, seed=0)
    lines: list[str] = []
    online = online_proposals(dataset, folder / "boxes", epochs=epochs, proposals=proposals,
                              echo=lines.append)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=folder / "ck", save_top_k=-1,
                                   **(checkpoint or {"every_n_epochs": 1, "filename": "{epoch}"}))])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, drop_last=True)
    model = SimCLR()
    online.fit(trainer, model, loader, ckpt_path=ckpt_path)
    return dataset, lines, model.seen


@pytest.mark.usefixtures("one_thread")
def test_a_lightly_run_crops_from_boxes_of_the_network_it_trains(demo_data, tmp_path):
    demo = demo_data(n_images=16, size=(128, 96), seed=0)
    dataset, lines, seen = _run(demo, tmp_path, epochs=3)
    # a warm-up epoch of scene crops, then the boxes of refreshes before epochs 2 and 3
    assert [ln.split(" before ")[1].split(":")[0] for ln in lines] == ["epoch 2", "epoch 3"]
    assert all(": 16 images, 160 boxes, 0 without any" in ln for ln in lines)
    stores = sorted((tmp_path / "boxes").iterdir())
    assert [p.name for p in stores] == ["epoch-0001.objcrop", "epoch-0002.objcrop"]
    assert ProposalStore(stores[0]).meta["online"] is True
    counts = dataset.recipe.fallbacks.as_dict()
    assert counts["samples"] == 3 * 16 and dataset.recipe.fallbacks.fallbacks == 0
    # the DataLoader worker switched stores as the epochs started
    assert seen == {0: {"none"}, 1: {"epoch-0001.objcrop"}, 2: {"epoch-0002.objcrop"}}
    # each refresh came before the checkpoint of the epoch before it, and is recorded there
    state = torch.load(tmp_path / "ck" / "epoch=0.ckpt", weights_only=False)["callbacks"]
    (made,) = [v["made"] for k, v in state.items() if "OnlineProposals" in k]
    assert sorted(made) == ["1"]

    # resumed and extended: only the refresh still due is made
    _, more, seen = _run(demo, tmp_path, epochs=4, ckpt_path=tmp_path / "ck" / "epoch=2.ckpt")
    assert [ln.split(" before ")[1].split(":")[0] for ln in more] == ["epoch 4"]
    assert seen == {3: {"epoch-0003.objcrop"}}


@pytest.mark.usefixtures("one_thread")
def test_resumed_from_a_step_checkpoint_or_last_the_workers_cut_from_its_store(demo_data,
                                                                             tmp_path):
    """Lightning starts the DataLoader's workers before its epoch hooks and, resuming a step
    checkpoint mid-epoch, skips them: the dataset's epoch is set before ``fit``. ``"last"`` is
    Lightning's last checkpoint."""
    demo = demo_data(n_images=16, size=(128, 96), seed=0)
    steps = {"every_n_train_steps": 2, "filename": "{epoch}-{step}", "save_last": True}
    _run(demo, tmp_path, epochs=3, checkpoint=steps)  # 4 steps an epoch
    # halfway through the third epoch: its store, no refresh made again
    _, lines, seen = _run(demo, tmp_path, epochs=3, checkpoint=steps,
                          ckpt_path=tmp_path / "ck" / "epoch=2-step=10.ckpt")
    assert lines == [] and seen == {2: {"epoch-0002.objcrop"}}
    # the last checkpoint (the third epoch's last step), extended: the refresh before epoch 4
    _, lines, seen = _run(demo, tmp_path, epochs=4, checkpoint=steps, ckpt_path="last")
    assert [ln.split(" before ")[1].split(":")[0] for ln in lines] == ["epoch 4"]
    assert seen == {3: {"epoch-0003.objcrop"}}


def test_trainer_fit_without_the_callbacks_fit_is_refused(demo_data, tmp_path):
    demo = demo_data(n_images=16, size=(128, 96), seed=0)
    dataset = ObjectAwareDataset(demo.root, "online", size=64)
    online = online_proposals(dataset, tmp_path / "boxes", epochs=2)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[online],
                         enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    with pytest.raises(ValueError, match=r"callback was not started.*Fix: callback.fit"):
        trainer.fit(SimCLR(), loader)
    assert not (tmp_path / "boxes").exists()


def test_bad_settings_name_the_argument(demo_data, tmp_path):
    demo = demo_data(n_images=16, size=(128, 96), seed=0)
    dataset = ObjectAwareDataset(demo.root, "online", size=64)
    with pytest.raises(ValueError, match="proposals: 'onlin' is not a mode"):
        online_proposals(dataset, tmp_path, epochs=10, proposals="onlin")
    with pytest.raises(ValueError, match=r"proposals.warmup_epochs \(10\) must be below epochs"):
        online_proposals(dataset, tmp_path, epochs=10, proposals={"warmup_epochs": 10})
    per_box = ObjectAwareDataset(demo.root, demo.proposals_path, sampling="per_box", size=64)
    with pytest.raises(ValueError, match="needs a fixed proposal store"):
        online_proposals(per_box, tmp_path, epochs=10)


@pytest.mark.usefixtures("one_thread")
def test_a_plain_training_loop_refreshes_before_its_epochs(demo_data, tmp_path):
    """lightly's plain PyTorch loop: ``online.before_epoch(epoch, model.backbone)`` makes the
    refresh due and sets the dataset's epoch; its state goes in the loop's own checkpoint."""
    demo = demo_data(n_images=16, size=(128, 96), seed=0)

    def run(epochs, first=0, state=None):
        torch.manual_seed(0)
        dataset = Recording(demo.root, "online", size=64, seed=0)
        lines: list[str] = []
        online = online_proposals(dataset, tmp_path / "boxes", epochs=epochs, proposals=ONLINE,
                                  echo=lines.append)
        if state is not None:
            online.load_state_dict(state)
        model = SimCLR()
        optimizer = model.configure_optimizers()
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1,
                                             persistent_workers=True, drop_last=True)
        seen, saved = {}, None
        for epoch in range(first, epochs):
            online.before_epoch(epoch, model.backbone)
            for i, ((x0, x1), _, names) in enumerate(loader):
                seen.setdefault(epoch, set()).update(n.split("@")[1] for n in names)
                loss = model.training_step(((x0, x1), None, names), i)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            saved = online.state_dict()  # beside the model's weights in the loop's checkpoint
        return lines, seen, saved

    lines, seen, saved = run(3)
    assert [ln.split(" before ")[1].split(":")[0] for ln in lines] == ["epoch 2", "epoch 3"]
    assert seen == {0: {"none"}, 1: {"epoch-0001.objcrop"}, 2: {"epoch-0002.objcrop"}}
    assert sorted(saved["made"]) == ["1", "2"]
    # resumed after epoch 3 and extended: the stores it recorded are kept, one refresh is made
    lines, seen, _ = run(4, first=3, state=saved)
    assert [ln.split(" before ")[1].split(":")[0] for ln in lines] == ["epoch 4"]
    assert seen == {3: {"epoch-0003.objcrop"}}

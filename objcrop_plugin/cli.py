"""The ``objcrop`` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

DEFAULT_HOME = Path(os.environ.get("OBJCROP_HOME", Path.home() / ".cache" / "objcrop-plugin"))


def _demo_data(args: argparse.Namespace):
    from .data.synthetic import write_dataset

    root = Path(args.data_dir) if args.data_dir else DEFAULT_HOME / "demo"
    workers = getattr(args, "workers", 1)
    return write_dataset(root, n_images=args.n_images, size=args.image_size, seed=args.data_seed,
                         workers=workers, overwrite=args.overwrite)


def _size_wxh(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        w, h = (int(v) for v in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels (e.g. 640x480), got {text!r}")
    return w, h


def _int_from(lowest: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return _int_from(0, text)


def _add_demo_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the demo data lives (default: $OBJCROP_HOME/demo)")
    p.add_argument("--n-images", type=_positive_int, default=200,
                   help="demo images to generate (default 200)")
    p.add_argument("--image-size", type=_size_wxh, default=(640, 480),
                   help="demo image size WxH (default 640x480)")
    p.add_argument("--data-seed", type=_non_negative_int, default=0,
                   help="demo data seed (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the demo data in --data-dir when it was written with other "
                   "settings (only files the demo wrote are removed)")


def _readable(root: Path, keys: list[str], n: int) -> list[str]:
    """The first ``n`` of ``keys`` whose image decodes; each one that does not is named on
    stderr and passed over (a folder with one corrupt file still gets its picture)."""
    from .images import ImageDecodeError, read_image

    chosen: list[str] = []
    for key in keys:
        if len(chosen) == n:
            break
        try:
            read_image(root / key)
        except ImageDecodeError as e:
            print(f"objcrop show: skipped {key}: {e}", file=sys.stderr)
            continue
        chosen.append(key)
    return chosen


def _k_or_all(text: str) -> int | None:
    """``--k`` of proposals eval: a count >= 1, or ``all`` (every proposal)."""
    if text.strip().lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a count >= 1, or 'all'")
    return k


def cmd_show(args: argparse.Namespace) -> int:
    from .files import check_output
    from .proposals.store import ProposalStore
    from .viz import PICTURE_KIND, crops_figure

    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: the picture is a PNG. Fix: a name ending in .png")

    # before any work (the demo data may have to be written), and again once the inputs are known
    check_output(args.out, PICTURE_KIND, [args.root, args.proposals], args.force)
    if args.root:
        root = Path(args.root)
        store = ProposalStore(args.proposals) if args.proposals else None
        from .images import list_images

        keys = list_images(root)
    else:
        demo = _demo_data(args)
        root, keys = demo.root, list(demo.keys)
        store = ProposalStore(args.proposals or demo.proposals_path)
    if args.keys:
        missing = [k for k in args.keys if not (Path(root) / k).is_file()]
        if missing:
            from .registry import did_you_mean

            known = [str(k) for k in keys]
            hints = "".join(did_you_mean(k, known) for k in missing[:1])
            raise FileNotFoundError(
                f"--keys: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not under "
                f"{root}.{hints} Keys are image paths relative to the folder, as `objcrop "
                f"check {root}` or the store list them (e.g. '{known[0] if known else '?'}')"
            )
        keys = args.keys  # named by the user: one that cannot be read is an error naming it
    else:
        candidates = keys[args.first :]
        if not candidates:
            raise ValueError(f"--first {args.first} is past the last image of {root} "
                             f"({len(keys)} images). Fix: a smaller --first")
        keys = _readable(Path(root), candidates, args.n)
        if not keys:
            raise ValueError(f"no image of {root} from index {args.first} on could be read "
                             f"({len(candidates)} tried); check the folder with objcrop check")
    check_output(args.out, PICTURE_KIND, [root, store and store.path], args.force)
    out = crops_figure(
        root, keys, store, recipes=args.views, out=args.out, seed=args.seed,
        photometrics=args.photometrics,
    )
    print(f"wrote {out} ({len(keys)} images, recipes: {', '.join(args.views)})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.synthetic import load_labels
    from .demo import run_demo
    from .files import check_output
    from .proposals.store import ProposalStore
    from .viz import PICTURE_KIND, crops_figure

    out = Path(args.out)
    data_dir = args.data_dir or (DEFAULT_HOME / "demo-train")
    # before the minutes of training: crops.png may be the user's (run_demo checks results.json)
    check_output(out / "crops.png", PICTURE_KIND, [data_dir], args.force)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    results = run_demo(out, budget=args.budget, seed=args.seed, data_dir=data_dir, log=log,
                       force=args.force)
    root = Path(results["data_root"])
    keys = load_labels(root / "labels.json")[0][:4]
    picture = crops_figure(root, keys, ProposalStore(root / "proposals_gt.objcrop"),
                           out=check_output(out / "crops.png", PICTURE_KIND, [root], args.force),
                           seed=args.seed, tile=128)
    print(f"wrote {out / 'results.json'} and {picture}")
    result_line = next((ln for ln in reversed(lines) if ln.startswith("RESULT ")), None)
    if result_line:
        print(result_line)  # the machine-readable line stays the last one
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_recipe, to_dict

    overrides = [o for o in args.overrides if o != "--print-config"]
    print_config = args.print_config or len(overrides) < len(args.overrides)
    cfg = load_recipe(args.recipe, overrides)
    if print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from .train.runner import train

    result = train(cfg)
    if "eval" in result:
        e = result["eval"]
        print(f"RESULT probe_map={e['probe_map']:.2f} knn_map={e['knn_map']:.2f} "
              f"images_per_s={result['images_per_s']:.1f}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    demo = _demo_data(args)
    print(f"demo data: {len(demo.keys)} images in {demo.image_dir}")
    print(f"labels: {demo.labels_path}")
    print(f"ground-truth proposals: {demo.proposals_path}")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from .policies import CropPolicy
    from .registry import (
        RegistryError,
        list_policies,
        list_proposal_sources,
        load_policy,
        load_proposal_source,
    )

    by_kind = {
        "generator": "proposal generators (proposals build --method NAME)",
        "importer": "proposal importers (proposals import --source NAME)",
    }
    groups: dict[str, list[str]] = {
        "crop policies": [], "view recipes": [], **{v: [] for v in by_kind.values()},
        "other proposal sources": [],
    }
    broken: list[str] = []
    for name in list_policies():
        try:
            factory = load_policy(name)
        except RegistryError as exc:
            broken.append(f"  {name}: {exc}")
            continue
        is_policy = isinstance(factory, type) and issubclass(factory, CropPolicy)
        groups["crop policies" if is_policy else "view recipes"].append(name)
    for name in list_proposal_sources():
        try:
            kind = getattr(load_proposal_source(name), "kind", None)
        except RegistryError as exc:
            broken.append(f"  {name}: {exc}")
            continue
        groups[by_kind.get(kind, "other proposal sources")].append(name)
    for label, names in groups.items():
        if names:
            print(f"{label}: {', '.join(names)}")
    if broken:
        print("registered but not loadable:", *broken, sep="\n")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .proposals.importer_base import import_to_store, make_importer

    params = _parse_params(args.param)
    # an option naming a file or folder (images_json=, images_root=...) is an input too
    _check_store_out(args, [args.src, *_param_paths(params)])
    try:
        importer = make_importer(args.source, args.src, **params)
    except TypeError as exc:  # an option the importer does not take
        raise ValueError(str(exc)) from None
    n = import_to_store(importer, args.out)
    print(f"wrote {args.out} ({n} images)")
    missing = getattr(importer, "missing", None)
    if missing:
        print(f"{len(missing)} images listed in {args.src} were not found (skipped)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .files import check_output
    from .proposals.jsonl import JSONL_KIND, export_jsonl
    from .proposals.store import ProposalStore

    if args.out == "-":  # to standard output, for a pipe; what was done goes to stderr
        n = export_jsonl(ProposalStore(args.store), sys.stdout.buffer)
        print(f"wrote {n} images to standard output", file=sys.stderr)
        return 0
    check_output(args.out, JSONL_KIND, [args.store], args.force)
    n = export_jsonl(ProposalStore(args.store), args.out)
    print(f"wrote {args.out} ({n} images)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .proposals.store import ProposalStore

    store = ProposalStore(args.store)
    meta = dict(store.meta)
    files = meta.get("files")
    if isinstance(files, list) and not args.files:
        # one entry per image (the sizes a build saw, to tell a changed folder): counted here
        meta["files"] = f"{len(files)} entries (key and size of each image; --files lists them)"
    print(json.dumps({"path": str(store.path), "images": len(store), "boxes": store.n_boxes,
                      "meta": meta}, indent=2, ensure_ascii=False))
    return 0


def _check_store_out(args: argparse.Namespace, inputs: list, out: str | None = None) -> None:
    """``--out`` of a command writing a store (and its failures list): see check_output."""
    from .files import check_output
    from .proposals.store import FAILURES_KIND, STORE_KIND, failures_path

    out = out or args.out
    check_output(out, STORE_KIND, inputs, args.force)
    check_output(failures_path(Path(out)), FAILURES_KIND, inputs, args.force)


def _parse_params(items: list[str] | None) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--param expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return params


def _param_paths(params: dict) -> list[Path]:
    """The values of ``--param`` options that name an existing file or folder (inputs that
    ``--out`` must never replace)."""
    found: list[Path] = []
    values = list(params.values())
    while values:
        v = values.pop()
        if isinstance(v, (list, tuple)):
            values.extend(v)
        elif isinstance(v, dict):
            values.extend(v.values())
        elif isinstance(v, str) and v:
            p = Path(v).expanduser()
            with contextlib.suppress(OSError, ValueError):
                if p.exists():
                    found.append(p)
    return found


def cmd_build(args: argparse.Namespace) -> int:
    from .proposals.build import build_store, resolve_shard, shard_path

    params = _parse_params(args.param)
    # only what the user set: the same build from the API or the CLI has the same settings
    if args.top_k is not None:
        params["top_k"] = args.top_k
    if args.max_side is not None:
        params["max_side"] = args.max_side
    if args.bing_model:
        params["model_dir"] = str(args.bing_model)
    for opt, key in (("model", "model"), ("checkpoint", "checkpoint"), ("device", "device"),
                     ("batch_size", "batch_size")):
        if getattr(args, opt) is not None:
            params[key] = str(getattr(args, opt)) if opt == "checkpoint" else getattr(args, opt)
    shard = resolve_shard(args.shard)
    # what the generator reads is an input too: the checkpoint, the BING model folder (from
    # --bing-model, a --param, or $OBJCROP_BING_MODEL)
    inputs = [args.images_dir, *_param_paths(params)]
    if args.method.startswith("bing") and "model_dir" not in params:
        inputs += _param_paths({"env": os.environ.get("OBJCROP_BING_MODEL", "")})
    _check_store_out(args, inputs, str(shard_path(args.out, *shard)))
    summary = build_store(
        args.images_dir, args.out, method=args.method, params=params, workers=args.workers,
        shard=shard, chunk_size=args.chunk_size, max_pixels=args.max_pixels,
        progress=not args.no_progress, restart=args.restart,
    )
    print(summary.format())
    if shard[1] > 1:
        every = Path(args.out).with_name(f"{Path(args.out).stem}.shard-*-of-{shard[1]:05d}"
                                         f"{Path(args.out).suffix}")
        print(f"shard {shard[0]} of 0-{shard[1] - 1}; once every shard is built: objcrop "
              f"proposals merge {every} -o {args.out}")
    if summary.failure_rate > args.max_failure_rate:
        print(
            f"objcrop: {len(summary.failures)} of {summary.images} images failed "
            f"({summary.failure_rate:.1%} > --max-failure-rate {args.max_failure_rate:.1%})",
            file=sys.stderr,
        )
        return 3
    return 0


def cmd_import_coco(args: argparse.Namespace) -> int:
    from .proposals.importers import CocoImporter, import_to_store

    _check_store_out(args, [args.annotations, args.images_json, args.images_root])
    imp = CocoImporter(
        args.annotations, images_json=args.images_json, images_root=args.images_root,
        key_prefix=args.key_prefix, include_crowd=args.include_crowd, min_score=args.min_score,
    )
    n = import_to_store(imp, args.out)
    print(f"wrote {args.out} ({n} images)")
    left_out = {why: k for why, k in getattr(imp, "left_out", {}).items() if k}
    if left_out:
        hints = {"crowd": " (--include-crowd keeps them)", "below min_score": ""}
        print("left out: " + ", ".join(f"{k} {why} annotations{hints.get(why, '')}"
                                      for why, k in left_out.items()))
    missing = getattr(imp, "missing", [])
    if missing:
        print(f"{len(missing)} images listed in the JSON are not under --images-root (skipped)")
    return 0


def cmd_import_openimages(args: argparse.Namespace) -> int:
    from .proposals.importers import OpenImagesImporter, import_to_store

    _check_store_out(args, [args.boxes_csv, args.images_root])
    imp = OpenImagesImporter(args.boxes_csv, args.images_root, key_format=args.key_format,
                             include_group_of=not args.no_group_of)
    n = import_to_store(imp, args.out)
    print(f"wrote {args.out} ({n} images)")
    if imp.missing or imp.unreadable:
        print(f"skipped: {len(imp.missing)} images not found, {len(imp.unreadable)} unreadable")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .proposals.evaluate import format_stats, proposal_stats
    from .proposals.store import ProposalStore

    stats = proposal_stats(ProposalStore(args.store))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_proposals_eval(args: argparse.Namespace) -> int:
    from .proposals.evaluate import format_recall, open_ground_truth, recall
    from .proposals.store import ProposalStore

    # recognised by content: a store, JSON Lines, or COCO (whatever the file is called)
    gt = open_ground_truth(args.gt, images_json=args.gt_images_json, key_prefix=args.key_prefix)
    result = recall(ProposalStore(args.store), gt, tuple(args.iou), tuple(args.k))
    print(json.dumps(result, indent=2) if args.json else format_recall(result))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .proposals.build import merge_stores

    _check_store_out(args, args.stores)
    n = merge_stores(args.out, args.stores, allow_partial=args.allow_partial,
                     allow_mixed=args.allow_mixed)
    print(f"wrote {args.out} ({n} images from {len(args.stores)} stores)")
    return 0


#: what ``objcrop eval --json`` may replace: the numbers an earlier eval wrote
EVAL_KIND_HEAD = b'{\n  "probe_map": '


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate_backbone, load_backbone
    from .files import OutputKind, check_output

    if args.json:  # before any work; never over the labels, the checkpoint or another file
        check_output(args.json, OutputKind("eval JSON", lambda h: h.startswith(EVAL_KIND_HEAD)),
                     [args.root, args.labels, args.coco, args.checkpoint], args.force)
    if args.coco:
        from .proposals.importers import coco_labels

        keys, labels, _ = coco_labels(args.coco, key_prefix=args.key_prefix)
    else:
        from .data.synthetic import load_labels

        labels_file = Path(args.labels or Path(args.root) / "labels.json")
        if not args.labels and not labels_file.is_file():
            raise FileNotFoundError(
                f"objcrop eval needs labels: {labels_file} not found. Fix: pass --labels FILE "
                '(JSON: {"classes": [names], "images": [{"key": path relative to --root, '
                '"labels": [class indices]}]}) or --coco instances.json')
        try:
            keys, labels, _ = load_labels(labels_file)
        except ValueError as exc:  # a COCO instances file, as data.labels takes, or neither
            if "'classes'" not in str(exc):
                raise
            from .proposals.importers import ProposalFileError, coco_labels

            try:
                keys, labels, _ = coco_labels(labels_file, key_prefix=args.key_prefix)
            except (ProposalFileError, ValueError):
                raise exc from None
    net = load_backbone(args.model, args.checkpoint, args.prefix)
    if len(args.image_size) > 2:
        raise ValueError(f"--image-size takes one side or HEIGHT WIDTH, got "
                         f"{' '.join(map(str, args.image_size))}")
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    res = evaluate_backbone(
        net, args.root, keys, labels, train_fraction=args.train_fraction, seed=args.seed,
        image_size=size, batch_size=args.batch_size, num_workers=args.workers,
        probe={"epochs": args.epochs}, knn_kwargs={"k": args.k}, pooling=args.pooling,
        scale=args.scale,
    )
    # JSON has no NaN: a mAP with no class to average (no positive in the test split) is null
    import math

    import numpy as np

    log = logging.getLogger("objcrop_plugin.eval")
    summary: dict[str, object] = {k: None if math.isnan(float(res[k])) else float(res[k])
                               for k in ("probe_map", "knn_map", "prevalence_map")}
    n_classes = int(np.asarray(labels).reshape(len(keys), -1).shape[1]) if len(keys) else 0
    summary.update(n_train=int(res["n_train"]), n_test=int(res["n_test"]),
                   classes_evaluated=int(res["probe"]["classes_evaluated"]), classes=n_classes,
                   unreadable=res["unreadable"])
    if summary["probe_map"] is None:
        log.warning("objcrop eval: no class has a positive among the %d test images, so no "
                    "mAP can be computed. Fix: more labelled images, or another --seed or "
                    "--train-fraction", summary["n_test"])
    elif summary["classes_evaluated"] < n_classes:
        log.warning("objcrop eval: %d of the %d classes have no positive among the test "
                    "images; the mAPs average the other %d", n_classes -
                    summary["classes_evaluated"], n_classes, summary["classes_evaluated"])
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        from .files import atomic_write

        atomic_write(args.json, (text + "\n").encode())
    return 0


def _positive_int(text: str) -> int:
    return _int_from(1, text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text}")
    return value


def _add_force_arg(p: argparse.ArgumentParser, what: str = "store") -> None:
    p.add_argument(
        "--force", action="store_true",
        help=f"overwrite --out even when it is a regular file that is not a {what} written by "
        "objcrop (never an input of the command, a folder or a device)",
    )


def cmd_check(args: argparse.Namespace) -> int:
    from .files import OutputKind, check_output
    from .images import list_images, scan_images, write_bad_list

    root = Path(args.root)
    # its own list may be replaced; nothing the scan reads, nor another file without --force
    kind = OutputKind("bad-image list", lambda h: h.startswith(b"key\tproblem\tdetail\n"))
    check_output(args.out, kind, [root, args.proposals], args.force)
    keys = list_images(root)
    if not keys:
        from .images import IMAGE_EXTENSIONS

        raise ValueError(f"no image under {root} (files ending in {', '.join(IMAGE_EXTENSIONS)}; "
                         "hidden files and folders are skipped). Fix: pass the image folder")
    stored_size = None
    if args.proposals:
        from .proposals.store import ProposalStore

        store = ProposalStore(args.proposals)

        def stored_size(key: str) -> tuple[int, int] | None:
            props = store.get(key)
            return None if props is None else props.image_size

    rows = scan_images(root, keys, stored_size, progress=not args.no_progress)
    if not rows:
        print(f"objcrop check: all {len(keys)} images under {root} are readable"
              + (f" and match {args.proposals}" if args.proposals else ""))
        # an earlier run's list would still name images that are fine now
        if os.path.isfile(args.out) and not os.path.islink(args.out):
            with open(args.out, "rb") as f:
                earlier = kind.matches(f.read(kind.head_bytes))
            if earlier:
                os.unlink(args.out)
                print(f"objcrop check: removed the earlier list {args.out}")
        return 0
    out = write_bad_list(args.out, rows, ("key", "problem", "detail"))
    counts: dict[str, int] = {}
    for _key, problem, _detail in rows:
        counts[problem] = counts.get(problem, 0) + 1
    images = len({key for key, _, _ in rows})
    print(f"objcrop check: {images} of {len(keys)} images under {root} have problems ("
          + ", ".join(f"{n} {p}" for p, n in sorted(counts.items())) + f"); the list is in {out}",
          file=sys.stderr)
    return 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="objcrop",
        description="Object-aware cropping for self-supervised learning (lightly, solo-learn).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log fallbacks and details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    p = sub.add_parser("show", help="write a PNG of proposals and the views recipes cut from them")
    p.add_argument("--root", help="image folder (default: the embedded demo data)")
    p.add_argument("--proposals", help="proposal store (default: the demo's ground truth; with "
                   "--root, needed for every recipe but scene_scene)")
    p.add_argument("--views", nargs="+", default=["scene_scene", "obj_obj_dilate"],
                   help="view recipes to show (default: scene_scene obj_obj_dilate)")
    p.add_argument("--n", type=_positive_int, default=4, help="images to show (default 4)")
    p.add_argument("--first", type=_non_negative_int, default=0, help="index of the first image")
    p.add_argument("--keys", nargs="*", help="show these image keys instead")
    p.add_argument("--photometrics", default="none",
                   help="apply a photometric preset to the views (default none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", default="crops.png", help="output PNG (default crops.png)")
    _add_force_arg(p, "PNG")
    _add_demo_data_args(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "demo", help="the main job: SimCLR with scene vs object-aware crops on the demo data",
        description="Generate the demo data, pretrain the same small timm backbone with SimCLR "
        "twice (scene_scene vs obj_obj_dilate crops, same seed and budget), probe both and a "
        "random-initialised network (multi-label linear probe, mAP), write results.json and "
        "crops.png. The default budget takes 5-10 minutes on 2 CPU cores.",
    )
    p.add_argument("--out", default="objcrop-demo", help="output folder (default objcrop-demo)")
    p.add_argument("--budget", choices=["default", "full", "quick"], default="default")
    p.add_argument("--full", dest="budget", action="store_const", const="full",
                   help="the larger setting (same as --budget full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="where the training data is generated "
                   "(default: $OBJCROP_HOME/demo-train)")
    p.add_argument("--force", action="store_true",
                   help="replace results.json and crops.png in --out even when they are not "
                   "files an objcrop demo wrote")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train", help="pretrain from a YAML recipe (SimCLR, MoCo-v2, BYOL, VICReg; lightly)",
        description="Pretrain a timm backbone from a recipe. Overrides are dotted.key=value "
        "(values parsed as YAML), e.g. trainer.epochs=10 crop.params.top_k=5. Rerunning the "
        "same command resumes from OUT_DIR/checkpoints/last.ckpt.",
    )
    p.add_argument("recipe", help="recipe YAML (see recipes/lightly/)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted.key=value overrides")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo-data", help="generate the embedded demo data set")
    _add_demo_data_args(p)
    p.add_argument("--workers", type=int, default=1,
                   help="processes rendering in parallel (default 1); the images are the same for any value")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("eval", help="multi-label linear probe (mAP) and kNN on frozen features")
    p.add_argument("--root", required=True, help="dataset root (label keys are relative to it)")
    p.add_argument("--labels", help='labels JSON (default ROOT/labels.json): {"classes": [names], '
                   '"images": [{"key": path relative to ROOT, "labels": [class indices]}]}, or '
                   "a COCO instances JSON (as --coco)")
    p.add_argument("--coco", help="COCO annotations JSON: multi-hot of the categories present")
    p.add_argument("--key-prefix", default="")
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--checkpoint", help="weights to load (a timm state dict or a training checkpoint)")
    p.add_argument("--prefix", help="key prefix of the backbone inside the checkpoint")
    p.add_argument("--image-size", type=_positive_int, nargs="+", default=[224],
                   metavar="PX", help="the images' input size: one side (square) or HEIGHT "
                   "WIDTH, before --scale (default 224)")
    p.add_argument("--pooling", choices=("avg", "max", "avgmax"), default="avg",
                   help="feature pooling (the demo's protocol: avgmax)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the image size by this (the demo's protocol: 2)")
    p.add_argument("--train-fraction", type=float, default=0.7)
    p.add_argument("--epochs", type=int, default=100, help="linear probe epochs (default 100)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--force", action="store_true",
                   help="replace --json even when it is not a file objcrop eval wrote (never "
                   "an input of the command, a folder or a device)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("policies", help="list registered crop policies and proposal sources")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser(
        "check",
        help="scan an image folder for what training would stumble on; exit 3 when some are bad",
        description="Open and decode every image (and with --proposals check that its key is in "
        "the store with a stored size of the image's aspect ratio); write the bad ones to a "
        "tab-separated list. Exit 0 when clean, 3 when problems were found.",
    )
    p.add_argument("root", metavar="DATA", help="the image folder")
    p.add_argument("--proposals", metavar="STORE", help="the proposal store to check against")
    p.add_argument("--out", default="bad_images.tsv",
                   help="where the list goes (default: bad_images.tsv here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it is a file of another kind")
    p.set_defaults(func=cmd_check)

    prop = sub.add_parser("proposals", help="proposal stores").add_subparsers(
        dest="proposals_command", required=True
    )
    p = prop.add_parser(
        "import", help="a file of boxes (JSON Lines, COCO, OpenImages, a plugin's) -> store",
        description="Convert INPUT into a proposal store with a registered importer "
        "(`objcrop policies` lists them; third-party ones come from the entry-point group "
        "objcrop_plugin.proposals). Options are --param key=value, the importer's keyword "
        "arguments, e.g. --source coco --param key_prefix=train2017/.",
    )
    p.add_argument("src", metavar="INPUT")
    p.add_argument("--out", "-o", required=True, help="the store to write")
    _add_force_arg(p)
    p.add_argument("--source", default="jsonl",
                   help="importer: jsonl (default), coco, openimages, or a plugin's name")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="an importer option (repeatable; the value is parsed as JSON when it is)")
    p.set_defaults(func=cmd_import)
    p = prop.add_parser("export", help="proposal store -> JSON Lines")
    p.add_argument("store")
    p.add_argument("--out", "-o", required=True,
                   help="the JSON Lines file to write; - for standard output")
    _add_force_arg(p, "JSON Lines file")
    p.set_defaults(func=cmd_export)
    p = prop.add_parser(
        "build", help="run a proposal generator over an image folder (parallel, resumable)",
        description="Run a proposal generator over every image under IMAGES_DIR. Resumable: "
        "run the same command again after an interruption. Exit status 3 when more than "
        "--max-failure-rate of the images could not be read (they are listed in "
        "STORE.failures.tsv either way). One build per store at a time (a lock file beside "
        "it); an unfinished build is resumed only with the same settings.",
    )
    p.add_argument("images_dir")
    p.add_argument("--out", "-o", required=True,
                   help="the store to write; with --shard i/N, shard i is written beside it, "
                        "named with .shard-0000i-of-0000N before the suffix (p.objcrop: "
                        "p.shard-00000-of-00002.objcrop), and `objcrop proposals merge "
                        "SHARDS... -o OUT` joins them")
    _add_force_arg(p)
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished build of --out instead of resuming it")
    p.add_argument("--method", default="graph_segments",
                   help="generator: bing, bing_opencv, graph_segments, heatmap, "
                   "selective_search, token_cut")
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                   help="processes (default: the CPU count)")
    p.add_argument("--top-k", type=_positive_int, help="boxes kept per image (default 10)")
    p.add_argument("--max-side", type=_positive_int, help="working resolution (default 512)")
    p.add_argument("--bing-model", help="BING model folder (opencv_contrib "
                   "modules/saliency/samples/ObjectnessTrainedModel)")
    p.add_argument("--model", help="heatmap / token_cut: the timm model name")
    p.add_argument("--checkpoint", help="heatmap / token_cut: local weights for --model "
                   "(backbone.pth of `objcrop train`, a solo-learn or Lightning checkpoint, "
                   "a timm state dict); nothing is downloaded")
    p.add_argument("--device", help="heatmap / token_cut: auto (default), cpu, cuda, cuda:1...")
    p.add_argument("--batch-size", type=_positive_int,
                   help="heatmap / token_cut: images per forward pass (default 32 / 16)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="another generator parameter (repeatable)")
    p.add_argument("--shard", help="i/N: build every N-th image from i, into a shard file "
                   "named after --out (see --out; default: RANK/WORLD_SIZE or SLURM array "
                   "variables, else 0/1)")
    p.add_argument("--chunk-size", type=_positive_int, default=64,
                   help="images per resumable unit (default 64)")
    p.add_argument("--max-pixels", type=_positive_int, default=89_478_485,
                   help="larger images are failures (default 89478485, PIL's limit)")
    p.add_argument("--max-failure-rate", type=_fraction, default=0.01,
                   help="exit 3 above this fraction of failed images, 0-1 (default 0.01)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build)
    p = prop.add_parser(
        "merge", help="join shard stores into one",
        description="Join stores into one. Shards must all come from one build (same method, "
        "parameters and image list) and be complete (shards 0..N-1 of --shard i/N).",
    )
    p.add_argument("stores", nargs="+")
    p.add_argument("--out", "-o", required=True, help="the store to write")
    _add_force_arg(p)
    p.add_argument("--allow-partial", action="store_true",
                   help="merge an incomplete set of shards (the store's metadata says which)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="join stores of different builds (other methods or parameters)")
    p.set_defaults(func=cmd_merge)
    p = prop.add_parser("import-coco", help="COCO annotations or detection results -> store")
    p.add_argument("annotations", help="COCO annotations JSON, or a detection results JSON list")
    p.add_argument("--out", "-o", required=True, help="the store to write")
    _add_force_arg(p)
    p.add_argument("--images-json", help="annotations file giving image ids, names and sizes "
                   "(needed for a detection results file)")
    p.add_argument("--images-root", help="dataset root: images whose file is missing are skipped")
    p.add_argument("--key-prefix", default="", help="prepended to file_name to make the key, "
                   "e.g. 'train2017/' (mind the trailing slash)")
    p.add_argument("--include-crowd", action="store_true")
    p.add_argument("--min-score", type=float)
    p.set_defaults(func=cmd_import_coco)
    p = prop.add_parser("import-openimages", help="OpenImages box CSV -> store")
    p.add_argument("boxes_csv")
    p.add_argument("--images-root", required=True, help="dataset root (image sizes are read here)")
    p.add_argument("--out", "-o", required=True, help="the store to write")
    _add_force_arg(p)
    p.add_argument("--key-format", default="{image_id}.jpg", help="key of an ImageID, e.g. "
                   "'train/{image_id}.jpg' (default '{image_id}.jpg')")
    p.add_argument("--no-group-of", action="store_true", help="drop IsGroupOf boxes")
    p.set_defaults(func=cmd_import_openimages)
    p = prop.add_parser("stats", help="boxes per image, box sizes, images without proposals")
    p.add_argument("store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)
    p = prop.add_parser("eval", help="recall of a store against ground-truth boxes")
    p.add_argument("store")
    p.add_argument("--gt", required=True, help="ground truth: COCO annotations JSON, a store, "
                   "or JSON Lines (recognised by content)")
    p.add_argument("--gt-images-json", help="COCO ground truth only: the images table for a "
                   "results list")
    p.add_argument("--key-prefix", default="", help="COCO ground truth only: prepended to "
                   "file_name")
    p.add_argument("--iou", type=float, nargs="+", default=[0.5, 0.7],
                   help="IoU thresholds in (0, 1] (default 0.5 0.7)")
    p.add_argument("--k", type=_k_or_all, nargs="+", default=[1, 10, 100],
                   help="proposals per image counted, >= 1, or 'all' (default 1 10 100)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_proposals_eval)
    p = prop.add_parser("info", help="counts and metadata of a store")
    p.add_argument("store")
    p.add_argument("--files", action="store_true",
                   help="list the metadata's file entries (key and size of each image) too")
    p.set_defaults(func=cmd_info)
    return parser


class _CommandParser(argparse.ArgumentParser):
    """A command's parser (and its commands', argparse's default ``parser_class``): ``-v``
    after the command too (``objcrop check DATA -v``), not only before it; the command's flag
    never resets the one given before it (``SUPPRESS`` default)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="log fallbacks and details")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = getattr(args, "overrides", None)
    if overrides and any(o in ("-v", "--verbose") for o in overrides):  # after a recipe too
        args.overrides = [o for o in overrides if o not in ("-v", "--verbose")]
        args.verbose = True
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return rc
    except BrokenPipeError:
        # the reader went away (piped into head): stop quietly, as Unix tools do, and keep
        # the interpreter's final flush of stdout from raising again
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a tool ended by SIGPIPE
    except KeyboardInterrupt as exc:
        print(f"objcrop: {exc}" if str(exc) else "objcrop: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, LookupError, OSError) as exc:
        print(f"objcrop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

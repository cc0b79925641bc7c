"""``objcrop-solo``: find the solo-learn checkout, patch solo-learn, run its ``main_pretrain.py``.

::

    objcrop-solo --config-path recipes/solo --config-name mocov2plus.yaml \\
        data.train_path=datasets/coco/train2017 data.proposals=coco-train.objcrop

``objcrop-solo`` runs the ``main_pretrain.py`` of the user's checkout unchanged (found from
``--solo-root``, ``$SOLO_ROOT``, or the editable install of ``solo``) after :func:`.patch.install`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import INSTALL_HINT, INSTALL_STEPS, SoloConfigError, SoloNotFoundError
from .patch import STATE, install, uninstall

__all__ = ["USAGE", "end_of_run_line", "find_solo_root", "main", "split_args"]

USAGE = """\
usage: objcrop-solo [--solo-root DIR] --config-path DIR --config-name NAME.yaml [key=value ...]

Runs solo-learn's own main_pretrain.py (from --solo-root, $SOLO_ROOT, or the editable install
of solo) with object-aware crops: entries of the recipe's augmentations list may carry
'crop: object_aware' (or a mapping {policy: object_dilated, dilation: 0.1, ...}), and
data.proposals names the proposal store (keys relative to data.train_path). Every other
argument is solo-learn's (hydra's): --config-path, --config-name, key=value, ++key=value.
Relative --config-path values are relative to the current directory.
"""

_CONFIG_PATH = ("--config-path", "-cp")
_CONFIG_NAME = ("--config-name", "-cn")


def find_solo_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The solo-learn checkout whose ``main_pretrain.py`` to run.

    Looked up in order: ``explicit`` (``--solo-root``), ``$SOLO_ROOT``, then the folder above
    the ``solo`` package when it is an editable install of a checkout.

    Raises:
        SoloNotFoundError: none found; the message says how to install solo-learn.
    """
    for origin, value in (("--solo-root", explicit), ("SOLO_ROOT", os.environ.get("SOLO_ROOT"))):
        if value:
            root = Path(os.path.abspath(os.path.expanduser(os.fspath(value))))
            if not (root / "main_pretrain.py").is_file():
                raise SoloNotFoundError(
                    f"{origin}={value}: {root} is not a solo-learn checkout (no main_pretrain.py "
                    f"there). {INSTALL_STEPS}"
                )
            return root
    try:
        spec = importlib.util.find_spec("solo")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise SoloNotFoundError(f"{INSTALL_HINT}. {INSTALL_STEPS}")
    package = Path(spec.origin).resolve().parent
    root = package.parent
    if not (root / "main_pretrain.py").is_file():
        raise SoloNotFoundError(
            f"solo-learn is installed at {package}, but not as an editable install of a "
            "checkout: its main_pretrain.py is not beside it. Fix: pass --solo-root DIR or set "
            "SOLO_ROOT to a checkout, or reinstall it with pip install --no-deps -e <checkout> "
            "(with the setuptools<82 build constraint, see README)"
        )
    return root


def split_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(solo_root, hydra arguments)`` with ``--config-path`` made absolute.

    hydra resolves a relative ``--config-path`` against the directory of
    ``main_pretrain.py``; a user expects the current directory.

    Raises:
        SoloConfigError: no ``--config-path``/``--config-name``, a config folder that does not
            exist, or a recipe that is not in it.
    """
    solo_root = None
    out: list[str] = []
    config_dir = config_name = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        takes = flag in ("--solo-root", *_CONFIG_PATH, *_CONFIG_NAME) and arg.startswith("-")
        if takes and not eq:
            if i + 1 >= len(args):
                raise SoloConfigError(f"{flag} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if not takes:
            out.append(arg)
        elif flag == "--solo-root":
            solo_root = value
        elif flag in _CONFIG_PATH:
            config_dir = os.path.abspath(os.path.expanduser(value))
            out += ["--config-path", config_dir]
        else:
            config_name = value
            out += ["--config-name", value]
    if config_dir is None or config_name is None:
        raise SoloConfigError(
            "objcrop-solo takes solo-learn's own arguments: --config-path DIR --config-name "
            "NAME.yaml [key=value ...] (both are needed)"
        )
    if not os.path.isdir(config_dir):
        raise SoloConfigError(f"--config-path: {config_dir} is not a folder")
    candidates = [config_name] if config_name.endswith((".yaml", ".yml")) else [
        config_name, f"{config_name}.yaml"]
    if not any(os.path.isfile(os.path.join(config_dir, c)) for c in candidates):
        raise SoloConfigError(f"--config-name: no recipe {config_name} in {config_dir}")
    return solo_root, out


def end_of_run_line() -> str | None:
    """What the run's object-aware crops did: samples, how many were cut from proposals, the
    scene-crop fallbacks by cause, and the unreadable images skipped (with an example)."""
    planner, dataset = STATE.planner, STATE.dataset
    parts = []
    if planner is not None:
        counter = planner.recipe.fallbacks
        counts, fallbacks = counter.as_dict(), counter.fallbacks
        samples = counts["samples"]
        warmup_counter = getattr(planner, "warmup", None)  # online proposals' warm-up
        warmup = warmup_counter.as_dict()["samples"] if warmup_counter is not None else 0
        if samples:
            during = f" ({warmup} of them in the warm-up, scene crops)" if warmup else ""
            parts.append(
                f"{samples} samples{during}, {samples - warmup - fallbacks} cropped from "
                f"proposals, {fallbacks} "
                f"fell back to scene crops (no entry: {counts['missing']}, no usable box: "
                f"{counts['unusable']}, stored size of another aspect: {counts['mismatched']})"
            )
    bad = getattr(dataset, "bad", None)
    if bad is not None and bad.count:
        indices = bad.indices()
        example = ""
        if indices:
            try:
                example = f", e.g. {dataset.item(indices[0])[0]}"
            except Exception:  # noqa: BLE001 - the count matters more than the example
                example = ""
        noun = "image" if bad.count == 1 else "images"
        parts.append(f"{bad.count} unreadable {noun} skipped{example} (data.max_failure_rate "
                     f"{bad.max_failure_rate:g})")
    return f"objcrop: {'; '.join(parts)}" if parts else None


def _report_fallbacks() -> None:
    line = end_of_run_line()
    if line:
        print(line, file=sys.stderr)
    if STATE.error:
        print(f"objcrop-solo: error: {STATE.error}", file=sys.stderr)


def _run_as_main(script: Path) -> None:
    """Run ``script`` as ``__main__`` (as ``runpy.run_path`` does, but leaving ``sys.argv[0]``
    as set: Lightning starts further DDP ranks from it)."""
    import types

    code = compile(script.read_bytes(), str(script), "exec")
    module = types.ModuleType("__main__")
    module.__file__ = str(script)
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def main(argv: Sequence[str] | None = None) -> int:
    """``objcrop-solo``: run solo-learn's ``main_pretrain.py`` with object-aware crops."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        solo_root, hydra_args = split_args(argv)
        root = find_solo_root(solo_root)
        install(root)
    except (SoloConfigError, SoloNotFoundError) as exc:
        print(f"objcrop-solo: error: {exc}", file=sys.stderr)
        return 2
    script = root / "main_pretrain.py"
    saved_argv = sys.argv
    # further DDP ranks are started as `python sys.argv[0] ARGS`: the plugin's own entry, so
    # they install it too (rank_entry.py); hydra finds its recipe from main_pretrain's file
    sys.argv = [str(Path(__file__).with_name("rank_entry.py")), *hydra_args]
    os.environ["OBJCROP_SOLO_ROOT"] = str(root)
    STATE.cli = True
    try:
        _run_as_main(script)
    finally:
        sys.argv = saved_argv
        STATE.cli = False
        _report_fallbacks()
        uninstall()
    return 0

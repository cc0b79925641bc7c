"""The top-level package: its exports, imported on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import objcrop_plugin


def test_every_export_resolves_and_unknown_names_raise():
    import objcrop_plugin.proposals as proposals

    for package in (objcrop_plugin, proposals):
        # the names the package imports on first use are the ones it exports
        lazy = {name for names in package._EXPORTS.values() for name in names}
        assert set(package.__all__) - {"__version__"} == lazy, package.__name__
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        assert set(package.__all__) <= set(dir(package))
    from objcrop_plugin import ObjectCropDataset
    from objcrop_plugin.engine import ObjectCropDataset as same

    assert ObjectCropDataset is same
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        objcrop_plugin.NoSuchThing  # noqa: B018


def test_the_package_and_the_commands_help_start_without_torch():
    """``import objcrop_plugin`` and ``objcrop --help`` (in a fresh interpreter) import neither
    torch nor torchvision: the help answers at once instead of after seconds of imports. A
    submodule is still an attribute of its package without an import of its own."""
    code = ("import sys, objcrop_plugin, objcrop_plugin.proposals as P\n"
            "assert P.store.ProposalStore is P.ProposalStore  # a submodule as an attribute\n"
            "from objcrop_plugin.cli import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: objcrop" in out.stdout and out.stdout.rstrip().endswith("[]"), out.stdout

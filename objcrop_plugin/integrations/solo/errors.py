"""The adapter's two errors and the solo-learn install instructions they carry."""

from __future__ import annotations

__all__ = ["INSTALL_HINT", "INSTALL_STEPS", "SoloConfigError", "SoloNotFoundError"]

INSTALL_HINT = (
    "solo-learn is not installed: check out github.com/vturrisi/solo-learn and pip install "
    "--no-deps --build-constraint <file with setuptools<82> <checkout> (older pip: "
    "PIP_CONSTRAINT=<file> pip install --no-deps <checkout>; see README)"
)

INSTALL_STEPS = (
    "Fix: git clone https://github.com/vturrisi/solo-learn && "
    "printf 'setuptools<82\\n' > solo-build-constraints.txt && "
    "pip install --no-deps --build-constraint solo-build-constraints.txt -e solo-learn "
    "(older pip: PIP_CONSTRAINT=solo-build-constraints.txt pip install --no-deps -e solo-learn), "
    'then pip install "objcrop-plugin[solo]"; or pass --solo-root DIR / set SOLO_ROOT to a '
    "checkout."
)


class SoloConfigError(ValueError):
    """A recipe the adapter cannot run; the message names the key and the fix."""


class SoloNotFoundError(ImportError):
    """No solo-learn checkout could be found; the message says how to install one."""

"""Object-aware cropping for solo-learn: ``objcrop-solo`` and the pieces it is made of.

Importing this module does not import solo-learn; running ``objcrop-solo`` (or
:func:`install`) needs a solo-learn checkout (see ``docs/solo-learn.md``). See
:mod:`objcrop_plugin.integrations.solo`.
"""

from .integrations import solo as _solo
from .integrations.solo import *  # noqa: F403

__all__ = list(_solo.__all__)

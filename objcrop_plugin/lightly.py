"""Object-aware cropping for lightly: ``from objcrop_plugin.lightly import ObjectAwareCollate``.

Needs lightly (``pip install "objcrop-plugin[lightly]"``); importing this module without it
raises an ImportError that says so. See :mod:`objcrop_plugin.integrations.lightly`.
"""

from .integrations.lightly import ObjectAwareCollate, ObjectAwareDataset

__all__ = ["ObjectAwareCollate", "ObjectAwareDataset"]

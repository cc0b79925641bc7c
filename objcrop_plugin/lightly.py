"""Object-aware cropping for lightly: ``from objcrop_plugin.lightly import ObjectAwareCollate``.

``ObjectAwareViews`` (transforms-v2 style: image + boxes in, views out, for data that carries
its boxes) lives in :mod:`objcrop_plugin.transforms` and needs no lightly; it is re-exported here.

Needs lightly (``pip install "objcrop-plugin[lightly]"``); importing this module without it
raises an ImportError that says so. See :mod:`objcrop_plugin.integrations.lightly`.
"""

from .integrations.lightly import ObjectAwareCollate, ObjectAwareDataset, online_proposals
from .transforms import ObjectAwareViews

__all__ = ["ObjectAwareCollate", "ObjectAwareDataset", "ObjectAwareViews", "online_proposals"]

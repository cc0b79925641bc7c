"""solo-learn adapter: object-aware crops in solo-learn's own YAML recipes and ``main_pretrain.py``.

A solo-learn user keeps their checkout, recipes and habits. They add ``crop: object_aware`` to
entries of a recipe's ``augmentations`` list and ``data.proposals: PATH`` to its ``data``
node, and run ``objcrop-solo`` with solo-learn's own arguments (``docs/solo-learn.md``). The
public import path is :mod:`objcrop_plugin.solo`; this package holds one job per module:

- :mod:`.errors`: :class:`SoloConfigError`, :class:`SoloNotFoundError`, the install hint;
- :mod:`.config`: the object-aware recipe keys, read and checked (:func:`parse_object_aware`);
- :mod:`.transform`: :class:`ObjectAwareTransform`, solo-learn's pipelines with object-aware
  crops;
- :mod:`.datasets`: solo-learn's training dataset as picklable module-level classes;
- :mod:`.backbone`: ``backbone.name: timm`` (:func:`timm_backbone`) and timm's registry
  repaired after ``import solo``;
- :mod:`.gpu`: ``crop.engine: gpu``, views cut on the device after the transfer;
- :mod:`.patch`: :func:`install` / :func:`uninstall`, what is patched in solo-learn, in memory;
- :mod:`.cli`: :func:`main`, the ``objcrop-solo`` command.

Importing it does not import solo-learn.

Reference:
    Mishra et al., "Object-aware Cropping for Self-Supervised Learning", TMLR 2022,
    https://arxiv.org/abs/2112.00319
"""

from .backbone import timm_backbone
from .cli import main
from .config import parse_object_aware
from .errors import SoloConfigError, SoloNotFoundError
from .patch import install, uninstall
from .transform import ObjectAwareTransform

__all__ = [
    "ObjectAwareTransform",
    "SoloConfigError",
    "SoloNotFoundError",
    "install",
    "main",
    "parse_object_aware",
    "timm_backbone",
    "uninstall",
]

"""objcrop-plugin: object-aware cropping for self-supervised learning.

Views are cut from object proposals instead of random scene crops (Mishra et al., "Object-aware
Cropping for Self-Supervised Learning", TMLR 2022), for lightly and solo-learn methods.

The top level holds what users call and what plugin authors subclass; everything else lives in
its subpackage (``objcrop_plugin.engine``, ``.proposals``, ``.policies``, ``.lightly``,
``.solo``, ``.train``, ``.eval``). See docs/architecture.md for the layers.

Example:
    >>> from objcrop_plugin import ObjectCropDataset  # doctest: +SKIP
    >>> ds = ObjectCropDataset("images/", "proposals.objcrop", views="obj_obj_dilate")  # doctest: +SKIP
    >>> views, target, key = ds[0]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from .engine import ObjectCropDataset, make_photometrics
    from .images import ImageDecodeError
    from .policies import (
        CropPolicy,
        CropWindow,
        NoProposalError,
        ViewRecipe,
        ViewSpec,
        make_policy,
        make_recipe,
    )
    from .proposals import (
        MissingProposalsError,
        ProposalGenerator,
        ProposalImporter,
        ProposalStore,
        StoreFormatError,
    )
    from .registry import RegistryError, list_policies, list_proposal_sources
    from .transforms import ObjectAwareViews

# The exports are imported on first use (PEP 562): ``import objcrop_plugin`` and the
# ``objcrop`` command's help and light commands do not wait for torch and torchvision.
_EXPORTS = {
    ".engine": ("ObjectCropDataset", "make_photometrics"),
    ".images": ("ImageDecodeError",),
    ".policies": ("CropPolicy", "CropWindow", "NoProposalError", "ViewRecipe", "ViewSpec",
                  "make_policy", "make_recipe"),
    ".proposals": ("MissingProposalsError", "ProposalGenerator", "ProposalImporter",
                   "ProposalStore", "StoreFormatError"),
    ".registry": ("RegistryError", "list_policies", "list_proposal_sources"),
    ".transforms": ("ObjectAwareViews",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__version__ = "0.1.0"

__all__ = [
    # datasets and the pieces underneath
    "ObjectCropDataset",
    "ObjectAwareViews",
    "ProposalStore",
    "make_recipe",
    "make_policy",
    "make_photometrics",
    "CropWindow",
    "list_policies",
    "list_proposal_sources",
    # for plugin authors (entry-point groups objcrop_plugin.policies / objcrop_plugin.proposals)
    "CropPolicy",
    "ViewRecipe",
    "ViewSpec",
    "ProposalGenerator",
    "ProposalImporter",
    # errors
    "ImageDecodeError",
    "MissingProposalsError",
    "NoProposalError",
    "RegistryError",
    "StoreFormatError",
    "__version__",
]

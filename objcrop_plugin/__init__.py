"""objcrop-plugin: object-aware cropping for self-supervised learning.

Views are cut from object proposals instead of random scene crops (Mishra et al., "Object-aware
Cropping for Self-Supervised Learning", TMLR 2022), for lightly and solo-learn methods.

Example:
    >>> from objcrop_plugin import ObjectCropDataset  # doctest: +SKIP
    >>> ds = ObjectCropDataset("images/", "proposals.objcrop", views="obj_obj_dilate")  # doctest: +SKIP
    >>> views, target, key = ds[0]  # doctest: +SKIP
"""

from . import boxes
from .engine import (
    ImageDecodeError,
    ObjectCropDataset,
    Photometric,
    PhotometricSet,
    ViewEngine,
    photometrics,
)
from .policies import (
    CropPolicy,
    CropWindow,
    NoProposalError,
    ObjectDilatedPolicy,
    ObjectPolicy,
    ProposalChoice,
    ScenePolicy,
    ViewRecipe,
    ViewSpec,
    make_policy,
    make_recipe,
)
from .proposals import (
    MissingProposalsError,
    ProposalRecord,
    Proposals,
    ProposalStore,
    ProposalStoreWriter,
    StoreFormatError,
    export_jsonl,
    import_jsonl,
    normalize_key,
)
from .registry import RegistryError, list_policies, list_proposal_sources
from .stats import FallbackCounter

__version__ = "0.1.0"

__all__ = [
    "CropPolicy",
    "CropWindow",
    "FallbackCounter",
    "ImageDecodeError",
    "MissingProposalsError",
    "NoProposalError",
    "ObjectCropDataset",
    "ObjectDilatedPolicy",
    "ObjectPolicy",
    "Photometric",
    "PhotometricSet",
    "ProposalChoice",
    "ProposalRecord",
    "ProposalStore",
    "ProposalStoreWriter",
    "Proposals",
    "RegistryError",
    "ScenePolicy",
    "StoreFormatError",
    "ViewEngine",
    "ViewRecipe",
    "ViewSpec",
    "boxes",
    "export_jsonl",
    "import_jsonl",
    "list_policies",
    "list_proposal_sources",
    "make_policy",
    "make_recipe",
    "normalize_key",
    "photometrics",
    "__version__",
]

"""Object-aware cropping for solo-learn: ``objcrop-solo`` and the pieces it is made of.

Importing this module does not import solo-learn; running ``objcrop-solo`` (or
:func:`install`) needs a solo-learn checkout (see ``docs/solo-learn.md``). See
:mod:`objcrop_plugin.integrations.solo`.
"""

from .integrations.solo import (
    ObjectAwareConfig,
    ObjectAwareSoloDataset,
    ObjectAwareTransform,
    SoloConfigError,
    SoloNotFoundError,
    find_solo_root,
    import_solo,
    install,
    main,
    parse_object_aware,
    timm_backbone,
    uninstall,
)

__all__ = [
    "ObjectAwareConfig",
    "ObjectAwareSoloDataset",
    "ObjectAwareTransform",
    "SoloConfigError",
    "SoloNotFoundError",
    "find_solo_root",
    "import_solo",
    "install",
    "main",
    "parse_object_aware",
    "timm_backbone",
    "uninstall",
]

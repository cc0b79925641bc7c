"""Object-aware cropping for solo-learn: ``objcrop-solo`` and what a user calls from Python.

Importing this module does not import solo-learn; running ``objcrop-solo`` (``main``, or
``python -m objcrop_plugin.solo``) or :func:`install` needs a solo-learn checkout (see
``docs/solo-learn.md``). The implementation lives in :mod:`objcrop_plugin.integrations.solo`,
one module per job; only the names below are public.
"""

from .integrations.solo import (
    ObjectAwareTransform,
    SoloConfigError,
    SoloNotFoundError,
    install,
    main,
    parse_object_aware,
    timm_backbone,
    uninstall,
)

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

if __name__ == "__main__":
    import sys

    sys.exit(main())

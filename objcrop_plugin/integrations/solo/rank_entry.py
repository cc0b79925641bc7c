"""The script Lightning starts for each further DDP rank of an ``objcrop-solo`` run.

Lightning's DDP launcher starts ranks 1..n-1 as ``python sys.argv[0] ARGS`` when the main
module has no import spec, as solo-learn's ``main_pretrain.py`` run by ``objcrop-solo`` has not.
``objcrop-solo`` points ``sys.argv[0]`` here, so those ranks install the plugin too (its crops,
its ``timm`` backbone) instead of running solo-learn's script without it; the solo-learn
checkout comes from ``OBJCROP_SOLO_ROOT``, which the first rank sets.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    from objcrop_plugin.integrations.solo.cli import main

    root = os.environ.get("OBJCROP_SOLO_ROOT")
    sys.exit(main([*(["--solo-root", root] if root else []), *sys.argv[1:]]))

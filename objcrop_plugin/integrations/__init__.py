"""Thin adapters to host SSL libraries.

``lightly`` imports lightly; the ``solo`` package imports solo-learn only when it patches it
(``install``). Importing this package imports neither, so the core stays usable without them.
The public import paths are ``objcrop_plugin.lightly`` and ``objcrop_plugin.solo``.
"""

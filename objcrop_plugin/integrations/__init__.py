"""Thin adapters to host SSL libraries.

Each submodule imports its host library; importing this package imports none of them, so the
core stays usable without lightly or solo-learn. The public import paths are
``objcrop_plugin.lightly`` and ``objcrop_plugin.solo``.
"""

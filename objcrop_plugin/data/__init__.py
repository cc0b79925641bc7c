"""Demo data: deterministic multi-object scenes with ground-truth boxes and labels."""

from .synthetic import (
    CLASSES,
    GENERATOR_VERSION,
    SyntheticDataset,
    SyntheticImage,
    image_key,
    load_labels,
    multi_hot,
    render_scene,
    write_dataset,
)

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "SyntheticDataset",
    "SyntheticImage",
    "image_key",
    "load_labels",
    "multi_hot",
    "render_scene",
    "write_dataset",
]

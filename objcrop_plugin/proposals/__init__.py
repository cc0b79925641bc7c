"""Object proposals: the memory-mapped store, proposal sources (generators and importers), the
dataset-scale build, and recall/statistics.

The OpenCV- and model-backed generators (:mod:`.bing`, :mod:`.segments`) are not imported here:
the registry loads them by name (``make_generator("bing", ...)``) when they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .build import build_store, make_generator, merge_stores
    from .evaluate import format_recall, format_stats, proposal_stats, recall
    from .generators import ProposalGenerator
    from .importer_base import ProposalImporter, import_to_store, make_importer
    from .importers import CocoImporter, OpenImagesImporter, coco_labels
    from .jsonl import JsonLinesImporter, ProposalFileError, export_jsonl, import_jsonl, read_jsonl
    from .store import (
        MissingProposalsError,
        ProposalRecord,
        Proposals,
        ProposalStore,
        ProposalStoreWriter,
        StoreFormatError,
        normalize_key,
    )

# imported on first use: ``objcrop proposals info`` and ``objcrop policies`` need no torch
_EXPORTS = {
    ".build": ("build_store", "make_generator", "merge_stores"),
    ".evaluate": ("format_recall", "format_stats", "proposal_stats", "recall"),
    ".generators": ("ProposalGenerator",),
    ".importer_base": ("ProposalImporter", "import_to_store", "make_importer"),
    ".importers": ("CocoImporter", "OpenImagesImporter", "coco_labels"),
    ".jsonl": ("JsonLinesImporter", "ProposalFileError", "export_jsonl", "import_jsonl",
               "read_jsonl"),
    ".store": ("MissingProposalsError", "ProposalRecord", "Proposals", "ProposalStore",
               "ProposalStoreWriter", "StoreFormatError", "normalize_key"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "CocoImporter",
    "JsonLinesImporter",
    "MissingProposalsError",
    "OpenImagesImporter",
    "ProposalFileError",
    "ProposalGenerator",
    "ProposalImporter",
    "ProposalRecord",
    "ProposalStore",
    "ProposalStoreWriter",
    "Proposals",
    "StoreFormatError",
    "build_store",
    "coco_labels",
    "export_jsonl",
    "format_recall",
    "format_stats",
    "import_jsonl",
    "import_to_store",
    "make_generator",
    "make_importer",
    "merge_stores",
    "normalize_key",
    "proposal_stats",
    "read_jsonl",
    "recall",
]

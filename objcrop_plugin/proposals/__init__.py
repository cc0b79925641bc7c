"""Object proposals: the memory-mapped store, JSON Lines interchange, and proposal sources."""

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

# heavier parts load on first use (they import the engine, which imports the store)
_LAZY = {
    "CocoImporter": "importers",
    "OpenImagesImporter": "importers",
    "coco_labels": "importers",
    "import_to_store": "importers",
    "proposal_stats": "evaluate",
    "format_stats": "evaluate",
    "recall": "evaluate",
    "format_recall": "evaluate",
    "ProposalGenerator": "generators",
    "build_store": "build",
    "merge_stores": "build",
    "make_generator": "build",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "JsonLinesImporter",
    "MissingProposalsError",
    "ProposalFileError",
    "ProposalRecord",
    "ProposalStore",
    "ProposalStoreWriter",
    "Proposals",
    "StoreFormatError",
    "export_jsonl",
    "import_jsonl",
    "normalize_key",
    "read_jsonl",
]

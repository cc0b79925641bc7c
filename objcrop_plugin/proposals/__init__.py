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

__all__ = [
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

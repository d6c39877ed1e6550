"""Shipped datasets and the documents analoglock harvests from.

Owns the on-disk formats (see FORMAT.md), their validation, and the `Document` type that the
harvester consumes. Knows nothing of models except in `corpus`, which samples text from one.
"""

from analoglock.data.documents import Document, Span, read_text_documents
from analoglock.data.loaders import (
    ContrastItem,
    ContrastSet,
    DatasetFormatError,
    StoryPair,
    available_datasets,
    concept_documents,
    load_concepts,
    load_documents,
    load_pairs,
    pair_documents,
)

__all__ = [
    "ContrastItem",
    "ContrastSet",
    "DatasetFormatError",
    "Document",
    "Span",
    "StoryPair",
    "available_datasets",
    "concept_documents",
    "load_concepts",
    "load_documents",
    "load_pairs",
    "pair_documents",
    "read_text_documents",
]

"""Event, decision and error schemas (JSON via orjson, strict validation, versioned)."""

from schemas.events import (
    PLATFORMS,
    SCHEMA_VERSION,
    SLICES,
    Click,
    DeadLetter,
    Decision,
    Purchase,
    SchemaError,
    decode,
    decode_click,
    decode_decision,
    decode_purchase,
    slice_of,
)

__all__ = [
    "PLATFORMS", "SCHEMA_VERSION", "SLICES", "Click", "DeadLetter", "Decision", "Purchase", "SchemaError",
    "decode", "decode_click", "decode_decision", "decode_purchase", "slice_of",
]

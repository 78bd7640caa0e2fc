//! DLPack export (placeholder: being written).

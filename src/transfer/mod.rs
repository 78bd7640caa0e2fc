//! Copy engine (placeholder: being written).

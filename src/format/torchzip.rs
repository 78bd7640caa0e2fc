//! torch.save zip archives (placeholder: being written).
#![forbid(unsafe_code)]
use std::path::Path;
use super::Parsed;
use crate::error::{Error, Result};
pub fn parse(path: &Path, _bytes: &[u8]) -> Result<Parsed> {
    Err(Error::malformed(path, "zip", "not written yet"))
}

//! Helpers shared by the integration tests.

use std::path::Path;

/// Shrinks `path` to `len` bytes while the test holds it mapped, as another process might.
/// Returns false where the OS refuses: Windows will not shrink a mapped file
/// (`ERROR_USER_MAPPED_FILE`), so the hazard under test cannot arise there.
pub fn shrink_mapped_file(path: &Path, len: u64) -> bool {
    let shrunk = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len);
    if cfg!(windows) {
        assert_eq!(shrunk.unwrap_err().raw_os_error(), Some(1224));
        return false;
    }
    shrunk.unwrap();
    true
}

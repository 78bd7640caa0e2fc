//! Module rules of ARCHITECTURE.md that the compiler does not check, checked on the source:
//! `src/format/` (parsers and the data model) never reaches for the file system, threads
//! or the rest of the crate beyond the error and dtype tables. Opening, mapping and reading
//! a file is `src/checkpoint.rs`'s; reads are `src/fileio.rs`'s.

use std::path::{Path, PathBuf};

/// What code in `src/format/` may not name (comments aside; tests beside the code aside).
const FORBIDDEN_IN_FORMAT: &[&str] = &[
    "std::fs",
    "std::thread",
    "std::env",
    "std::process",
    "std::net",
    "File::",
    "fs::File",
    "OpenOptions",
    "Mapping",
    "crate::mapping",
    "crate::fileio",
    "crate::checkpoint",
    "crate::transfer",
    "crate::dlpack",
    "crate::py",
    "pyo3",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines of `src` that name something: before its `#[cfg(test)]` module, outside
/// comments.
fn code_lines(src: &str) -> impl Iterator<Item = (usize, &str)> {
    let code = src.split("#[cfg(test)]").next().unwrap_or("");
    code.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.split("//").next().unwrap_or("")))
}

fn violations(src: &str) -> Vec<(usize, &'static str)> {
    code_lines(src)
        .flat_map(|(n, line)| {
            FORBIDDEN_IN_FORMAT
                .iter()
                .filter(move |f| line.contains(**f))
                .map(move |f| (n, *f))
        })
        .collect()
}

#[test]
fn format_never_touches_the_file_system() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/format");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(files.len() >= 5, "src/format/ has its parsers: {files:?}");
    let mut found = Vec::new();
    for path in &files {
        let src = std::fs::read_to_string(path).unwrap();
        for (line, what) in violations(&src) {
            found.push(format!("{}:{line}: {what}", path.display()));
        }
    }
    assert!(
        found.is_empty(),
        "src/format/ holds parsers and the data model only; file access belongs in \
         src/checkpoint.rs or src/fileio.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_what_it_forbids_and_skips_comments_and_tests() {
    let src = "use std::path::Path;\n\
               // a comment about Mapping::reader is fine\n\
               let m = Mapping::open(p); // and so is this one: std::fs\n\
               let f = std::fs::File::open(p);\n\
               #[cfg(test)]\nmod tests { use std::fs; }\n";
    assert_eq!(
        violations(src),
        vec![
            (3, "Mapping"),
            (4, "std::fs"),
            (4, "File::"),
            (4, "fs::File")
        ]
    );
}

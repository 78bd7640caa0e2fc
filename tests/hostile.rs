//! Regression tests for hostile inputs found by the hostile suite and the fuzzers, run
//! against the pure core (`cargo test --no-default-features`).

use std::path::Path;

use _core::checkpoint;
use _core::format::{self, pickle};
use _core::Error;

mod common;

/// A minimal stored (method 0) zip writer that, unlike the `zip` crate's, writes whatever
/// it is told: duplicate names, flag bits, lying sizes.
struct Entry<'a> {
    name: &'a str,
    data: &'a [u8],
    flags: u16,
    method: u16,
}

fn stored(name: &str, data: &[u8]) -> Entry<'static> {
    Entry {
        name: Box::leak(name.to_string().into_boxed_str()),
        data: Box::leak(data.to_vec().into_boxed_slice()),
        flags: 0,
        method: 0,
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn write_zip(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u32;
        let (n, size, crc) = (e.name.len() as u16, e.data.len() as u32, crc32(e.data));
        let common = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes()); // version needed
            v.extend_from_slice(&e.flags.to_le_bytes());
            v.extend_from_slice(&e.method.to_le_bytes());
            v.extend_from_slice(&[0; 4]); // time, date
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&n.to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // extra length
        };
        out.extend_from_slice(b"PK\x03\x04");
        common(&mut out);
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(e.data);

        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        common(&mut central);
        central.extend_from_slice(&[0; 6]); // comment len, disk, internal attrs
        central.extend_from_slice(&[0; 4]); // external attrs
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
    }
    let cd_start = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    out.extend_from_slice(&[0; 4]); // disk numbers
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_start.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// `{"w": <float32 tensor of 4 elements in storage "0">}`, protocol 2, as torch writes it.
const STATE_DICT_PKL: &[u8] = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n\
_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04\
X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x04tq\x07QK\x00K\x04\x85q\x08K\x01\
\x85q\x09\x89ccollections\nOrderedDict\nq\x0a)Rq\x0btq\x0cRq\x0ds.";

fn torch_zip(extra: impl FnOnce(&mut Vec<Entry<'static>>)) -> Vec<u8> {
    let mut entries = vec![
        stored("archive/data.pkl", STATE_DICT_PKL),
        stored("archive/byteorder", b"little"),
        stored("archive/data/0", &[0u8; 16]),
        stored("archive/version", b"3\n"),
    ];
    extra(&mut entries);
    write_zip(&entries)
}

fn parse(bytes: &[u8]) -> Result<format::Parsed, Error> {
    format::parse(Path::new("/hostile/model.pth"), bytes)
}

fn assert_malformed(r: Result<format::Parsed, Error>, needle: &str) {
    match r {
        Err(e @ (Error::Malformed { .. } | Error::Unsupported { .. })) => {
            let msg = e.to_string();
            assert!(msg.starts_with("/hostile/model.pth: "), "{msg}");
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
        other => panic!("expected a refusal mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn control_zip_parses() {
    let p = parse(&torch_zip(|_| {})).expect("the hand-written zip is a valid checkpoint");
    assert_eq!(p.storages.len(), 1);
    assert_eq!(p.storages[0].nbytes, 16);
    assert_eq!(p.tensors[0].shape, vec![4]);
}

#[test]
fn duplicate_data_pkl_is_refused() {
    // Found by tests/test_hostile.py: the zip crate keeps one entry per name, so a second
    // `data.pkl` (which another reader might pick) was silently ignored.
    let bytes = torch_zip(|e| e.push(stored("archive/data.pkl", b"\x80\x02N.")));
    assert_malformed(parse(&bytes), "entry name twice");
}

#[test]
fn duplicate_storage_record_is_refused() {
    let bytes = torch_zip(|e| e.push(stored("archive/data/0", &[1u8; 16])));
    assert_malformed(parse(&bytes), "entry name twice");
}

#[test]
fn encrypted_and_compressed_records_are_refused() {
    let bytes = torch_zip(|e| e[2].flags = 1);
    assert_malformed(parse(&bytes), "encrypted");
    let bytes = torch_zip(|e| e[2].method = 8);
    assert_malformed(parse(&bytes), "compressed");
}

#[test]
fn short_and_missing_records_are_refused() {
    let bytes = torch_zip(|e| e[2] = stored("archive/data/0", &[0u8; 15]));
    assert_malformed(parse(&bytes), "record holds 15 bytes");
    let bytes = torch_zip(|e| {
        e.remove(2);
    });
    assert_malformed(parse(&bytes), "missing");
    let bytes = torch_zip(|e| e[1] = stored("archive/byteorder", b"big"));
    assert_malformed(parse(&bytes), "only little-endian");
}

#[test]
fn forbidden_globals_are_refused_by_the_vm() {
    for body in [
        &b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R."[..],
        b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.",
        b"\x80\x02ccopyreg\n_reconstructor\n.",
    ] {
        match pickle::unpickle(body) {
            Err(pickle::PickleError::Forbidden { .. }) => {}
            other => panic!("{body:?}: expected Forbidden, got {other:?}"),
        }
    }
}

#[test]
fn huge_length_claims_fail_without_allocating() {
    // BINUNICODE8 / BINBYTES8 claiming 2^62 bytes: refused from the length, not by an
    // allocation failure (which would abort the process).
    for op in [0x8du8, 0x8e, 0x96] {
        let mut body = vec![0x80, 0x02, op];
        body.extend_from_slice(&(1u64 << 62).to_le_bytes());
        body.extend_from_slice(b"abc.");
        assert!(pickle::unpickle(&body).is_err(), "opcode {op:#x}");
    }
}

#[test]
fn deep_nesting_is_bounded() {
    let mut body = vec![0x80, 0x02];
    body.extend(std::iter::repeat_n(b'(', 100_000));
    body.extend(std::iter::repeat_n(b'l', 100_000));
    body.push(b'.');
    assert!(pickle::unpickle(&body).is_err());
}

/// A safetensors file with one tensor described by `info` (JSON) and `data`.
fn safetensors_with(info: &str, data: &[u8]) -> Vec<u8> {
    let header = format!("{{\"w\": {info}}}");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn empty_tensors_with_sizes_torch_cannot_hold_are_refused() {
    // Found by the hostile suite: an empty tensor's byte span is empty whatever its sizes,
    // so [0, 2^63 + 5] passed validation and torch raised TypeError building it.
    for shape in [
        "[0, 9223372036854775813]",
        "[18446744073709551615, 0]",
        "[0, 4611686018427387904, 4]",
    ] {
        let info = format!("{{\"dtype\": \"F32\", \"shape\": {shape}, \"data_offsets\": [0, 0]}}");
        assert_malformed(parse(&safetensors_with(&info, b"")), "int64");
    }
    // Sizes that fit stay loadable (torch accepts them).
    let info =
        "{\"dtype\": \"F32\", \"shape\": [0, 4611686018427387904], \"data_offsets\": [0, 0]}";
    parse(&safetensors_with(info, b"")).unwrap();
}

#[test]
fn negative_strides_are_refused_even_on_empty_tensors() {
    let path = Path::new("neg.pth");
    let base = format::Parsed {
        format: format::Format::TorchZip,
        storages: vec![format::Storage {
            key: "0".into(),
            location: "cpu".into(),
            offset: 0,
            nbytes: 24,
        }],
        tensors: vec![format::Tensor {
            storage: 0,
            dtype: _core::DType::F32,
            shape: vec![0],
            strides: vec![-1],
            storage_offset: 0,
            requires_grad: false,
        }],
        objects: format::ObjectGraph {
            nodes: vec![format::Value::Tensor(0)],
            root: 0,
        },
        metadata: None,
        unrepresentable: Vec::new(),
    };
    let e = format::validate(path, 100, &base).unwrap_err().to_string();
    assert!(e.contains("neg.pth") && e.contains("negative"), "{e}");
    let mut ok = base.clone();
    ok.tensors[0].strides = vec![1];
    format::validate(path, 100, &ok).unwrap();
}

#[test]
#[cfg(unix)]
fn fifos_and_devices_are_refused_without_blocking() {
    // A FIFO under a checkpoint's name used to block `open` forever (no writer).
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = _core::mapping::Mapping::open(&fifo)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not a regular file"),
        "{e}"
    );
    let e = _core::mapping::Mapping::open(Path::new("/dev/null"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn files_truncated_after_mapping_give_errors_not_sigbus() {
    // Opening maps the file, then parses it. Parsing reads with pread, so a file cut short
    // in between is a clean error; reading those bytes through the map would be SIGBUS.
    let dir = tempfile::tempdir().unwrap();
    let info = "{\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}";
    let files = [
        ("model.safetensors", safetensors_with(info, &[0u8; 16])),
        ("model.pth", torch_zip(|_| {})),
    ];
    for (name, bytes) in files {
        let path = dir.path().join(name);
        // Cut points inside every structure parsing reads: the length prefix or zip
        // signature, the JSON header or the local headers, and the zip's trailing directory.
        for cut in [0, 3, 8, 12, 40, bytes.len() - 30, bytes.len() - 1] {
            std::fs::write(&path, &bytes).unwrap();
            let mapping = _core::mapping::Mapping::open(&path).unwrap();
            if !common::shrink_mapped_file(&path, cut as u64) {
                continue;
            }
            let header_cut = name.ends_with(".pth") || cut < bytes.len() - 16;
            match checkpoint::parse_mapped(&path, &mapping) {
                Err(e) => assert!(e.to_string().contains(name), "{e}"),
                // Only a cut inside a safetensors data section can go unnoticed here
                // (the loader's reads of the data catch it later).
                Ok(_) => assert!(!header_cut, "{name} cut at {cut} parsed"),
            }
        }
    }
}

#[test]
fn parsing_an_open_file_agrees_with_parsing_its_bytes() {
    // The fuzzers drive `format::parse` on bytes; `zeroload.load` runs `parse_mapped`,
    // which reads the same structures with pread. Both must give the same answer, on real
    // files and on corrupted ones (byte flips, truncations).
    let dir = tempfile::tempdir().unwrap();
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/open_and_plan");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut checked = 0;
    for entry in std::fs::read_dir(seeds).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let original = std::fs::read(entry.path()).unwrap();
        let mut variants = vec![original.clone()];
        for _ in 0..40 {
            let mut flipped = original.clone();
            let i = next() as usize % flipped.len();
            flipped[i] ^= 1 << (next() % 8);
            variants.push(flipped);
            variants.push(original[..next() as usize % original.len()].to_vec());
        }
        let path = dir.path().join(&name);
        for bytes in variants {
            std::fs::write(&path, &bytes).unwrap();
            let mapping = _core::mapping::Mapping::open(&path).unwrap();
            let from_file = checkpoint::parse_mapped(&path, &mapping).map_err(|e| e.to_string());
            let from_bytes = format::parse(&path, &bytes).map_err(|e| e.to_string());
            assert_eq!(from_file, from_bytes, "{name}, {} bytes", bytes.len());
            checked += 1;
        }
    }
    assert!(checked >= 7 * 81, "seeds missing: {checked} cases");
}

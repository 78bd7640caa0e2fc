//! The copy engine end to end without Python: plans executed by the host sink against real
//! files, and the CUDA sink without a usable driver.

use std::io::Write;

use _core::mapping::Mapping;
use _core::transfer::{cuda, host, CopyRequest, Extent, Outcome, PROGRESS_STEP};

mod common;

fn file_with(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.bin");
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect();
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    (dir, path, data)
}

/// Host copies of many ranges into separate buffers, with every thread count.
#[test]
fn host_sink_copies_every_range() {
    let (_d, path, data) = file_with(3 * 1024 * 1024 + 123);
    let m = Mapping::open(&path).unwrap();
    let ranges: Vec<(u64, u64)> = vec![
        (0, 10),
        (10, 1 << 20),
        (5, 100),            // overlaps the others in the file: read again
        ((1 << 20) + 10, 0), // empty
        (2 << 20, (1 << 20) + 123),
        (17, 999_983),
    ];
    for threads in [None, Some(1), Some(2), Some(7)] {
        let mut bufs: Vec<Vec<u8>> = ranges.iter().map(|&(_, n)| vec![0u8; n as usize]).collect();
        let reqs: Vec<CopyRequest> = ranges
            .iter()
            .zip(bufs.iter_mut())
            .filter(|((_, n), _)| *n > 0)
            .map(|(&(off, n), b)| CopyRequest {
                file_offset: off,
                nbytes: n,
                dest: b.as_mut_ptr() as u64,
            })
            .collect();
        let mut calls = Vec::new();
        let mut cb = |d: u64, t: u64| {
            calls.push((d, t));
            true
        };
        // SAFETY: every destination is a live Vec of exactly `nbytes` bytes that nothing
        // else touches during the call.
        let out = unsafe { host::copy_to_host(&m, &reqs, threads, &mut cb) }.unwrap();
        assert_eq!(out, Outcome::Done);
        for (&(off, n), b) in ranges.iter().zip(&bufs) {
            assert_eq!(&b[..], &data[off as usize..(off + n) as usize]);
        }
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(calls.first(), Some(&(0, total)));
        assert_eq!(calls.last(), Some(&(total, total)));
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    }
}

#[test]
fn host_sink_cancels_from_the_callback() {
    let (_d, path, _data) = file_with((4 * PROGRESS_STEP) as usize);
    let m = Mapping::open(&path).unwrap();
    let mut buf = vec![0u8; (4 * PROGRESS_STEP) as usize];
    let reqs = [CopyRequest {
        file_offset: 0,
        nbytes: buf.len() as u64,
        dest: buf.as_mut_ptr() as u64,
    }];
    let mut n = 0;
    let mut cb = |_d: u64, _t: u64| {
        n += 1;
        n < 2
    };
    // SAFETY: `buf` is live, exactly `nbytes` long, and untouched during the call.
    let out = unsafe { host::copy_to_host(&m, &reqs, Some(2), &mut cb) }.unwrap();
    assert_eq!(out, Outcome::Cancelled);
}

#[test]
fn host_sink_refuses_ranges_outside_the_file_before_writing() {
    let (_d, path, _data) = file_with(100);
    let m = Mapping::open(&path).unwrap();
    let mut buf = vec![7u8; 50];
    let reqs = [CopyRequest {
        file_offset: 60,
        nbytes: 50,
        dest: buf.as_mut_ptr() as u64,
    }];
    let mut cb = |_d: u64, _t: u64| true;
    // SAFETY: `buf` is live and 50 bytes long; nothing else touches it.
    let e = unsafe { host::copy_to_host(&m, &reqs, None, &mut cb) }.unwrap_err();
    assert!(e.to_string().contains("outside the file"), "{e}");
    assert!(buf.iter().all(|&b| b == 7), "nothing written");
}

#[test]
fn host_sink_reports_a_file_truncated_under_it() {
    let (_d, path, _data) = file_with(1 << 20);
    let m = Mapping::open(&path).unwrap();
    // Truncate after mapping: the plan (built from the mapped length) accepts the range,
    // the pread finds the file short. No SIGBUS: nothing reads through the map.
    if !common::shrink_mapped_file(&path, 1000) {
        return;
    }
    let mut buf = vec![0u8; 1 << 20];
    let reqs = [CopyRequest {
        file_offset: 0,
        nbytes: buf.len() as u64,
        dest: buf.as_mut_ptr() as u64,
    }];
    let mut cb = |_d: u64, _t: u64| true;
    // SAFETY: `buf` is live and exactly `nbytes` long; nothing else touches it.
    let e = unsafe { host::copy_to_host(&m, &reqs, Some(3), &mut cb) }.unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

/// Without a usable driver (none installed, or none of its devices visible) CUDA is
/// "unavailable": no panic, no driver error, and a copy is refused before anything is
/// touched. The checks run in a child process with `CUDA_VISIBLE_DEVICES=""`, so they hold
/// on machines with a GPU too (there the real driver loads and reports no device; without
/// a driver the library is missing).
#[test]
fn without_a_usable_driver_cuda_is_unavailable_not_a_panic() {
    const NAME: &str = "without_a_usable_driver_cuda_is_unavailable_not_a_panic";
    if std::env::var_os("ZEROLOAD_TEST_CHILD").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env("ZEROLOAD_TEST_CHILD", "1")
            .env("CUDA_VISIBLE_DEVICES", "")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the child failed:\n{text}");
        assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
        assert!(text.contains("checked: "), "{text}");
        return;
    }
    assert!(!cuda::is_available());
    assert_eq!(cuda::device_count().unwrap(), 0);
    assert_eq!(cuda::staging_allocated(), None);
    assert!(!cuda::release_staging().unwrap(), "nothing to free");
    let (_d, path, _data) = file_with(4096);
    let m = Mapping::open(&path).unwrap();
    let reqs = [CopyRequest {
        file_offset: 0,
        nbytes: 16,
        dest: 0xdead_0000,
    }];
    let dests = [Extent {
        addr: 0xdead_0000,
        nbytes: 16,
    }];
    let mut calls = 0;
    let mut cb = |_d: u64, _t: u64| {
        calls += 1;
        true
    };
    let opts = cuda::CudaOptions {
        device: 0,
        budget: Some(8 << 20),
        direct: true,
        readers: Some(2),
    };
    // SAFETY: without a usable driver nothing is copied; the call fails before touching
    // `dest` (which is not memory of ours: the test fails loudly if it ever is written).
    let e = unsafe { cuda::copy_to_cuda(&m, &dests, &reqs, opts, &mut cb) }.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, _core::Error::CudaUnavailable(_)), "{e}");
    assert!(
        msg.contains("no CUDA driver library") || msg.contains("sees no device"),
        "{msg}"
    );
    assert_eq!(calls, 0, "refused before progress started");
    println!("checked: {msg}");
}

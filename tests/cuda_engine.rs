//! The CUDA engine end to end on `tests/fakecuda`, a fake CUDA driver that the engine
//! loads instead of libcuda (no machine this project tests on has a GPU). The fake runs
//! each stream on its own thread after random delays, copies sources when the copy runs,
//! keeps device bytes where the host cannot read them through device addresses, and
//! records every misuse of the driver; each test asserts that none was recorded, that
//! bytes read back with `cuMemcpyDtoH_v2` equal the file, and that nothing leaks.
//!
//! This is its own test binary: the driver library cudarc loads is process-wide, and the
//! other tests (`tests/transfer.rs`, the unit tests) check the behaviour without CUDA.
//!
//! Linux and Windows: the fake stands in for `libcuda.so` by its SONAME, and for
//! `nvcuda.dll` by its file name (Windows matches a loaded DLL by name).
#![cfg(any(target_os = "linux", windows))]
// The lock rules of clippy.toml are about threads attached to Python; this test binary
// runs no Python, and serialises its sessions with a plain lock.
#![allow(clippy::disallowed_types)]

use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use _core::mapping::Mapping;
use _core::transfer::cuda::{self, CudaOptions};
use _core::transfer::{CopyRequest, Extent, Outcome};
use _core::Error;

type Res = c_uint;
type Ctx = *mut c_void;

/// The fake's control functions and the driver calls tests use to set up and read back.
struct Fake {
    reset: extern "C" fn(),
    config: unsafe extern "C" fn(*const c_char, f64) -> c_int,
    fail: unsafe extern "C" fn(*const c_char, u64, Res, u64) -> c_int,
    fail_async: extern "C" fn(u64, Res),
    stub: extern "C" fn(Res),
    calls: unsafe extern "C" fn(*const c_char) -> u64,
    stat: unsafe extern "C" fn(*const c_char) -> u64,
    findings: unsafe extern "C" fn(*mut c_char, usize) -> usize,
    clear_findings: extern "C" fn(),
    enter: extern "C" fn(),
    leave: extern "C" fn() -> u64,
    check_leaks: extern "C" fn() -> u64,
    init: extern "C" fn(c_uint) -> Res,
    retain: unsafe extern "C" fn(*mut Ctx, c_int) -> Res,
    set_current: extern "C" fn(Ctx) -> Res,
    get_current: unsafe extern "C" fn(*mut Ctx) -> Res,
    mem_alloc: unsafe extern "C" fn(*mut u64, usize) -> Res,
    mem_free: extern "C" fn(u64) -> Res,
    htod: unsafe extern "C" fn(u64, *const c_void, usize) -> Res,
    dtoh: unsafe extern "C" fn(*mut c_void, u64, usize) -> Res,
    alloc_async: unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> Res,
    free_async: extern "C" fn(u64, *mut c_void) -> Res,
    reserve: unsafe extern "C" fn(*mut u64, usize, usize, u64, u64) -> Res,
    address_free: extern "C" fn(u64, usize) -> Res,
    create: unsafe extern "C" fn(*mut u64, usize, *const AllocProp, u64) -> Res,
    release: extern "C" fn(u64) -> Res,
    map: extern "C" fn(u64, usize, usize, u64, u64) -> Res,
    unmap: extern "C" fn(u64, usize) -> Res,
    set_access: unsafe extern "C" fn(u64, usize, *const AccessDesc, usize) -> Res,
}

/// `CUmemAllocationProp` (pinned device memory on `id`).
#[repr(C)]
struct AllocProp {
    type_: c_uint,
    handle_types: c_uint,
    location_type: c_uint,
    location_id: c_int,
    win32: *mut c_void,
    flags: [u8; 8],
}

/// `CUmemAccessDesc`.
#[repr(C)]
struct AccessDesc {
    location_type: c_uint,
    location_id: c_int,
    flags: c_uint,
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Where the fake is built (its own target directory: `cargo test` holds the lock of the
/// main one while tests run).
fn fake_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FAKECUDA_LIB") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "fakecuda",
            "--target-dir",
        ])
        .arg(root.join("target/fakecuda"))
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .status()
        .expect("run cargo to build tests/fakecuda");
    assert!(status.success(), "building tests/fakecuda failed");
    let release = root.join("target/fakecuda/release");
    if cfg!(windows) {
        // A copy named like the driver, which cudarc's LoadLibrary("nvcuda.dll") then finds.
        let named = release.join("nvcuda.dll");
        std::fs::copy(release.join("fakecuda.dll"), &named).expect("copy fakecuda.dll");
        return named;
    }
    release.join("libfakecuda.so")
}

/// Loads the fake (once) by absolute path, so that cudarc's `dlopen("libcuda.so")` (or
/// `LoadLibrary("nvcuda.dll")`) finds it by its name instead of searching for a real
/// driver. It stays loaded for the life of the process.
fn fake() -> &'static Fake {
    static FAKE: OnceLock<Fake> = OnceLock::new();
    FAKE.get_or_init(|| {
        let path = fake_path();
        #[cfg(unix)]
        // SAFETY: loads our own test library; its initialisers only set up Rust statics.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        }
        .map(libloading::Library::from);
        #[cfg(windows)]
        // SAFETY: as above.
        let lib = unsafe { libloading::Library::new(&path) };
        let lib = lib.unwrap_or_else(|e| panic!("loading the fake CUDA driver failed: {e}"));
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        macro_rules! sym {
            ($name:literal) => {{
                let n = c($name);
                // SAFETY: the library stays loaded (leaked); the name is NUL-terminated,
                // and the symbol is only read as an address here.
                let p: *mut c_void = *unsafe { lib.get::<*mut c_void>(n.as_bytes_with_nul()) }
                    .unwrap_or_else(|e| panic!("fakecuda lacks {}: {e}", $name));
                assert!(!p.is_null(), "fakecuda lacks {}", $name);
                // SAFETY: the symbol is a function with the signature of the field it is
                // stored in (see tests/fakecuda/src: control.rs and the driver entry
                // points); fn pointers and data pointers have the same size here.
                unsafe { std::mem::transmute_copy(&p) }
            }};
        }
        let f = Fake {
            reset: sym!("fakecuda_reset"),
            config: sym!("fakecuda_config"),
            fail: sym!("fakecuda_fail"),
            fail_async: sym!("fakecuda_fail_async"),
            stub: sym!("fakecuda_stub"),
            calls: sym!("fakecuda_calls"),
            stat: sym!("fakecuda_stat"),
            findings: sym!("fakecuda_findings"),
            clear_findings: sym!("fakecuda_clear_findings"),
            enter: sym!("fakecuda_enter"),
            leave: sym!("fakecuda_leave"),
            check_leaks: sym!("fakecuda_check_leaks"),
            init: sym!("cuInit"),
            retain: sym!("cuDevicePrimaryCtxRetain"),
            set_current: sym!("cuCtxSetCurrent"),
            get_current: sym!("cuCtxGetCurrent"),
            mem_alloc: sym!("cuMemAlloc_v2"),
            mem_free: sym!("cuMemFree_v2"),
            htod: sym!("cuMemcpyHtoD_v2"),
            dtoh: sym!("cuMemcpyDtoH_v2"),
            alloc_async: sym!("cuMemAllocAsync"),
            free_async: sym!("cuMemFreeAsync"),
            reserve: sym!("cuMemAddressReserve"),
            address_free: sym!("cuMemAddressFree"),
            create: sym!("cuMemCreate"),
            release: sym!("cuMemRelease"),
            map: sym!("cuMemMap"),
            unmap: sym!("cuMemUnmap"),
            set_access: sym!("cuMemSetAccess"),
        };
        assert!(
            cuda::is_available(),
            "the engine did not pick up the fake driver"
        );
        f
    })
}

impl Fake {
    fn config(&self, key: &str, v: f64) {
        // SAFETY: a NUL-terminated key.
        assert_eq!(unsafe { (self.config)(c(key).as_ptr(), v) }, 0, "{key}");
    }

    fn fail(&self, name: &str, nth: u64, code: Res, count: u64) {
        // SAFETY: a NUL-terminated name.
        unsafe { (self.fail)(c(name).as_ptr(), nth, code, count) };
    }

    fn calls(&self, name: &str) -> u64 {
        // SAFETY: a NUL-terminated name.
        unsafe { (self.calls)(c(name).as_ptr()) }
    }

    fn stat(&self, name: &str) -> u64 {
        // SAFETY: a NUL-terminated name.
        unsafe { (self.stat)(c(name).as_ptr()) }
    }

    fn findings(&self) -> String {
        // SAFETY: a null buffer asks for the length only.
        let n = unsafe { (self.findings)(std::ptr::null_mut(), 0) };
        let mut buf = vec![0u8; n + 1];
        // SAFETY: `buf` holds `n + 1` bytes.
        unsafe { (self.findings)(buf.as_mut_ptr().cast(), buf.len()) };
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// The findings so far, cleared.
    fn take_findings(&self) -> String {
        let f = self.findings();
        (self.clear_findings)();
        f
    }

    /// Device `dev`'s primary context, made current on this thread, as PyTorch does
    /// before it allocates.
    fn bind(&self, dev: i32) -> Ctx {
        let mut ctx: Ctx = std::ptr::null_mut();
        assert_eq!((self.init)(0), 0);
        // SAFETY: a valid out-pointer.
        assert_eq!(unsafe { (self.retain)(&mut ctx, dev) }, 0);
        assert_eq!((self.set_current)(ctx), 0);
        ctx
    }

    fn current(&self) -> usize {
        let mut ctx: Ctx = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        assert_eq!(unsafe { (self.get_current)(&mut ctx) }, 0);
        ctx as usize
    }

    /// `n` bytes of device memory on `dev`, filled with `fill`.
    fn alloc(&self, dev: i32, n: usize, fill: u8) -> u64 {
        self.bind(dev);
        let mut p = 0u64;
        // SAFETY: a valid out-pointer.
        assert_eq!(unsafe { (self.mem_alloc)(&mut p, n) }, 0);
        self.fill(p, n, fill);
        p
    }

    fn fill(&self, p: u64, n: usize, fill: u8) {
        let bytes = vec![fill; n];
        // SAFETY: `bytes` holds `n` bytes; `p` is device memory of `n` bytes.
        assert_eq!(unsafe { (self.htod)(p, bytes.as_ptr().cast(), n) }, 0);
    }

    fn free(&self, p: u64) {
        self.bind(0);
        assert_eq!((self.mem_free)(p), 0);
    }

    /// `n` bytes at device address `p`, read back through the driver.
    fn read(&self, p: u64, n: usize) -> Vec<u8> {
        self.bind(0);
        let mut v = vec![0u8; n];
        // SAFETY: `v` holds `n` bytes.
        assert_eq!(unsafe { (self.dtoh)(v.as_mut_ptr().cast(), p, n) }, 0);
        v
    }
}

/// One test at a time (the fake's faults and counters are process-wide). Starts from a
/// clean fake: no faults, no findings, two devices... eight, all quick.
fn session() -> (MutexGuard<'static, ()>, &'static Fake) {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let f = fake();
    (f.reset)();
    f.config("devices", 8.0);
    f.config("max_delay_us", 100.0);
    f.config("pinned_limit", 0.0);
    f.config("check_sources", 1.0);
    f.config("range_attributes", 1.0);
    (guard, f)
}

/// Ends a test: the staging resources free cleanly, nothing leaks, no findings.
fn finish(f: &Fake) {
    (f.reset)();
    cuda::release_staging().expect("release_staging");
    assert_eq!((f.check_leaks)(), 0, "{}", f.findings());
    assert_eq!(
        f.findings(),
        "",
        "contract violations recorded by the fake driver"
    );
    assert_eq!(f.stat("pending"), 0);
}

fn file_with(len: usize, seed: u64) -> (tempfile::TempDir, Arc<Mapping>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.bin");
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&path, &data).unwrap();
    let m = Mapping::open(&path).unwrap();
    (dir, m, data)
}

/// What a copy returns: the result, the progress calls, and whether every progress call
/// ran on the copying thread.
type Copied = (Result<Outcome, Error>, Vec<(u64, u64)>);

/// Runs one copy on a fresh thread that first makes device `torch_dev`'s context current
/// (as PyTorch would have), then runs `arm` (to inject faults after that setup), then the
/// copy of `reqs` into the buffers `dests`, watched by the fake (context restored, no work
/// pending on return). Fails the test if the copy does not end within two minutes.
fn copy_with(
    m: &Arc<Mapping>,
    dests: &[Extent],
    reqs: &[CopyRequest],
    opts: CudaOptions,
    torch_dev: Option<i32>,
    arm: impl FnOnce() + Send + 'static,
) -> Copied {
    let f = fake();
    let (tx, rx) = mpsc::channel();
    let (m, dests, reqs) = (m.clone(), dests.to_vec(), reqs.to_vec());
    std::thread::spawn(move || {
        if let Some(d) = torch_dev {
            f.bind(d);
        }
        arm();
        let mut calls = Vec::new();
        let me = std::thread::current().id();
        let mut cb = |d: u64, t: u64| {
            assert_eq!(
                std::thread::current().id(),
                me,
                "progress off the calling thread"
            );
            calls.push((d, t));
            true
        };
        (f.enter)();
        // SAFETY: every destination is live device memory of the fake, sized to its
        // request, that nothing else touches during the copy.
        let r = unsafe { cuda::copy_to_cuda(&m, &dests, &reqs, opts, &mut cb) };
        (f.leave)();
        let _ = tx.send((r, calls));
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the copy hung (or its thread panicked)")
}

/// Each request's destination range as a destination buffer of its own (as each tensor
/// is one in the Python bindings).
fn own(reqs: &[CopyRequest]) -> Vec<Extent> {
    reqs.iter()
        .map(|r| Extent {
            addr: r.dest,
            nbytes: r.nbytes,
        })
        .collect()
}

fn copy(m: &Arc<Mapping>, reqs: &[CopyRequest], opts: CudaOptions) -> Copied {
    copy_with(m, &own(reqs), reqs, opts, Some(0), || {})
}

fn opts(budget: u64, readers: usize, direct: bool) -> CudaOptions {
    CudaOptions {
        device: 0,
        budget: Some(budget),
        direct,
        readers: Some(readers),
    }
}

/// Destinations for `ranges` (file offset, length): the first half carved at odd offsets
/// out of one allocation (as a caching allocator hands out blocks of a segment), 0x5a
/// between them; the rest in allocations of their own. Returns the requests and the
/// arena.
struct Dests {
    reqs: Vec<CopyRequest>,
    arena: (u64, usize),
    own: Vec<u64>,
}

fn destinations(f: &Fake, ranges: &[(u64, u64)]) -> Dests {
    let half = ranges.len() / 2;
    let arena_len: usize = ranges[..half]
        .iter()
        .map(|r| r.1 as usize + 13)
        .sum::<usize>()
        + 13;
    let arena = f.alloc(0, arena_len, 0x5a);
    let mut at = arena + 13;
    let mut reqs = Vec::new();
    let mut own = Vec::new();
    for (i, &(off, n)) in ranges.iter().enumerate() {
        let dest = if i < half {
            let d = at;
            at += n + 13;
            d
        } else {
            let d = f.alloc(0, n as usize, 0x5a);
            own.push(d);
            d
        };
        reqs.push(CopyRequest {
            file_offset: off,
            nbytes: n,
            dest,
        });
    }
    Dests {
        reqs,
        arena: (arena, arena_len),
        own,
    }
}

impl Dests {
    /// Every destination holds its file bytes, and the arena's gaps were not written.
    fn check(&self, f: &Fake, data: &[u8], what: &str) {
        for r in &self.reqs {
            let got = f.read(r.dest, r.nbytes as usize);
            let want = &data[r.file_offset as usize..(r.file_offset + r.nbytes) as usize];
            assert!(
                got == want,
                "{what}: bytes {}+{} differ",
                r.file_offset,
                r.nbytes
            );
        }
        let arena = f.read(self.arena.0, self.arena.1);
        let mut written = vec![false; self.arena.1];
        for r in &self.reqs {
            if (self.arena.0..self.arena.0 + self.arena.1 as u64).contains(&r.dest) {
                let s = (r.dest - self.arena.0) as usize;
                written[s..s + r.nbytes as usize].fill(true);
            }
        }
        for (i, b) in arena.iter().enumerate() {
            assert!(
                written[i] || *b == 0x5a,
                "{what}: arena byte {i} was overwritten"
            );
        }
    }

    fn free(self, f: &Fake) {
        f.free(self.arena.0);
        for p in self.own {
            f.free(p);
        }
    }
}

const MIB: u64 = 1 << 20;

/// Sizes from 1 byte to many slabs, unaligned offsets, the same file bytes going to two
/// destinations (tied storages), the file's last byte.
fn ranges(len: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 1),
        (1, 7),
        (8, 4096),
        (4104, MIB + 3),
        (3, 100_000),
        (4104, MIB + 3),
        (5 * MIB + 17, 9 * MIB + 5),
        (15 * MIB, 8 * MIB - 1),
        (2 * MIB + 1, 333),
        (len - 234, 234),
    ]
}

#[test]
fn every_byte_arrives_with_any_budget_reader_count_and_o_direct() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(24 * MIB as usize + 1234, 7);
    let rs = ranges(data.len() as u64);
    let total: u64 = rs.iter().map(|r| r.1).sum();
    for budget in [1, 3 * MIB, 8 * MIB, 64 * MIB] {
        for readers in [1, 2, 8] {
            for direct in [false, true] {
                let what = format!("budget {budget}, {readers} readers, direct {direct}");
                let dests = destinations(f, &rs);
                let (r, calls) = copy(&m, &dests.reqs, opts(budget, readers, direct));
                assert_eq!(r.unwrap(), Outcome::Done, "{what}");
                assert_eq!(f.take_findings(), "", "{what}");
                dests.check(f, &data, &what);
                assert_eq!(calls.first(), Some(&(0, total)), "{what}");
                assert_eq!(calls.last(), Some(&(total, total)), "{what}");
                assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{what}");
                let (slab, n) = cuda::staging_allocated().unwrap();
                assert!(
                    slab * n as u64 <= budget.max(cuda::MIN_STAGING_BYTES),
                    "{what}"
                );
                dests.free(f);
            }
        }
    }
    // The file is many times the smallest ring: 24 MiB through 2 MiB of staging.
    finish(f);
}

#[test]
fn the_calling_threads_context_is_restored_whatever_it_was() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(3 * MIB as usize, 11);
    for torch_dev in [None, Some(0), Some(1)] {
        let dests = destinations(f, &[(5, 2 * MIB), (0, 10)]);
        let (tx, rx) = mpsc::channel();
        let (m2, reqs) = (m.clone(), dests.reqs.clone());
        std::thread::spawn(move || {
            if let Some(d) = torch_dev {
                f.bind(d);
            } else {
                (f.set_current)(std::ptr::null_mut());
            }
            let before = f.current();
            let mut cb = |_: u64, _: u64| true;
            // SAFETY: live device buffers sized to their requests.
            let r = unsafe {
                cuda::copy_to_cuda(&m2, &own(&reqs), &reqs, opts(4 * MIB, 2, false), &mut cb)
            };
            let _ = tx.send((r.map_err(|e| e.to_string()), before, f.current()));
        });
        let (r, before, after) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(r.unwrap(), Outcome::Done);
        assert_eq!(
            before, after,
            "context not restored (was cuda:{torch_dev:?})"
        );
        dests.check(f, &data, "restore");
        dests.free(f);
    }
    finish(f);
}

#[test]
fn streams_events_slabs_and_threads_are_reused_across_copies() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(MIB as usize, 3);
    cuda::release_staging().unwrap();
    let budget = 8 * MIB; // 8 slabs of 1 MiB
    let (slab, n) = cuda::ring_geometry(budget);
    assert_eq!((slab as u64, n), (MIB, 8));
    (f.reset)();
    for i in 0..40u64 {
        let dests = destinations(f, &[(i * 1000, 999 + i)]);
        let (r, _) = copy(&m, &dests.reqs, opts(budget, 4, false));
        assert_eq!(r.unwrap(), Outcome::Done);
        dests.check(f, &data, "loop");
        dests.free(f);
    }
    assert_eq!(f.calls("cuStreamCreate"), 1);
    assert_eq!(
        f.calls("cuEventCreate"),
        8,
        "one event per slab, created once"
    );
    assert_eq!(f.calls("cuMemHostAlloc"), 8, "the ring is pinned once");
    assert_eq!(f.stat("streams"), 1);
    assert_eq!(f.stat("stream_threads"), 1);
    assert_eq!(cuda::staging_allocated(), Some((MIB, 8)));
    // A copy to another device gets that device's own stream and events.
    f.bind(1);
    let mut p = 0u64;
    // SAFETY: a valid out-pointer; device 1's context is current.
    assert_eq!(unsafe { (f.mem_alloc)(&mut p, 4096) }, 0);
    let req = [CopyRequest {
        file_offset: 100,
        nbytes: 4096,
        dest: p,
    }];
    let (r, _) = copy(
        &m,
        &req,
        CudaOptions {
            device: 1,
            ..opts(budget, 2, false)
        },
    );
    assert_eq!(r.unwrap(), Outcome::Done);
    assert_eq!(f.read(p, 4096), &data[100..4196]);
    f.bind(1);
    assert_eq!((f.mem_free)(p), 0);
    assert_eq!(f.stat("streams"), 2);
    assert_eq!(
        f.calls("cuMemHostAlloc"),
        8,
        "the pinned ring serves every device"
    );
    finish(f);
}

#[test]
fn release_staging_frees_everything_and_the_next_copy_works() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(5 * MIB as usize, 5);
    let dests = destinations(f, &[(0, 5 * MIB)]);
    let (r, _) = copy(&m, &dests.reqs, opts(4 * MIB, 2, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    assert!(f.stat("pinned") > 0 && f.stat("streams") == 1 && f.stat("events") > 0);
    assert!(cuda::release_staging().unwrap());
    for what in ["pinned", "pinned_bytes", "streams", "events"] {
        assert_eq!(f.stat(what), 0, "{what} after release_staging");
    }
    // A destroyed stream's thread leaves once its queue is empty (at once here).
    for _ in 0..1000 {
        if f.stat("stream_threads") == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(f.stat("stream_threads"), 0);
    assert_eq!(cuda::staging_allocated(), None);
    assert!(!cuda::release_staging().unwrap(), "nothing left to free");
    f.fill(dests.reqs[0].dest, 5 * MIB as usize, 0);
    let (r, _) = copy(&m, &dests.reqs, opts(4 * MIB, 2, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    dests.check(f, &data, "after release");
    dests.free(f);
    finish(f);
}

#[test]
fn a_ring_that_cannot_be_pinned_whole_falls_back_and_warns_once() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(20 * MIB as usize, 9);
    cuda::release_staging().unwrap();
    let _ = cuda::take_staging_warning();
    // 64 MiB asks for 16 slabs of 4 MiB; the driver pins four, then runs out.
    f.fail("cuMemHostAlloc", 5, 2, 0);
    let dests = destinations(f, &[(0, 20 * MIB)]);
    let (r, _) = copy(&m, &dests.reqs, opts(64 * MIB, 2, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    dests.check(f, &data, "fallback");
    assert_eq!(cuda::staging_allocated(), Some((4 * MIB, 4)));
    let w = cuda::take_staging_warning().expect("a warning");
    assert!(
        w.contains("16 MiB of the 64 MiB") && w.contains("OUT_OF_MEMORY"),
        "{w}"
    );
    assert_eq!(cuda::take_staging_warning(), None, "said once");
    // The same budget again: the smaller ring is reused, no new attempt, no new warning.
    let pinned = f.calls("cuMemHostAlloc");
    let (r, _) = copy(&m, &dests.reqs, opts(64 * MIB, 2, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    assert_eq!(f.calls("cuMemHostAlloc"), pinned);
    assert_eq!(cuda::take_staging_warning(), None);
    (f.reset)();
    cuda::release_staging().unwrap();

    // Not even one slab of the asked size: halve until it fits (3 MiB pinnable).
    f.config("pinned_limit", (3 * MIB) as f64);
    let (r, _) = copy(&m, &dests.reqs, opts(64 * MIB, 2, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    dests.check(f, &data, "halved");
    assert_eq!(cuda::staging_allocated(), Some((MIB, 3)));
    assert!(cuda::take_staging_warning().is_some());
    cuda::release_staging().unwrap();

    // Less than the minimum: a clean error naming the call.
    f.config("pinned_limit", MIB as f64);
    let (r, _) = copy(&m, &dests.reqs, opts(64 * MIB, 2, false));
    let e = r.unwrap_err();
    assert!(
        matches!(&e, Error::Cuda { call, .. } if call == "cuMemHostAlloc"),
        "{e}"
    );
    assert!(e.to_string().contains("could not pin"), "{e}");
    f.config("pinned_limit", 0.0);
    assert_eq!(f.stat("pinned"), 0, "partial rings are freed");
    dests.free(f);
    finish(f);
}

/// A stub driver (every call `CUDA_ERROR_STUB_LIBRARY`) and a driver without devices
/// mean "CUDA unavailable", not a driver error.
#[test]
fn a_stub_driver_or_no_device_means_unavailable() {
    let (_g, f) = session();
    let (_d, m, _data) = file_with(4096, 1);
    cuda::release_staging().unwrap();
    let req = [CopyRequest {
        file_offset: 0,
        nbytes: 16,
        dest: 0x1000,
    }];
    for (setup, words) in [
        (Box::new(|| (f.stub)(34)) as Box<dyn Fn()>, "stub library"),
        (Box::new(|| f.config("devices", 0.0)), "no device"),
    ] {
        setup();
        assert!(!cuda::is_available());
        assert_eq!(cuda::device_count().unwrap(), 0);
        let mut cb = |_: u64, _: u64| true;
        // SAFETY: fails before any copy is issued.
        let e =
            unsafe { cuda::copy_to_cuda(&m, &own(&req), &req, opts(4 * MIB, 1, false), &mut cb) }
                .unwrap_err();
        assert!(matches!(e, Error::CudaUnavailable(_)), "{e}");
        assert!(e.to_string().contains(words), "{e}");
        (f.stub)(0);
        f.config("devices", 8.0);
        assert!(cuda::is_available());
    }
    finish(f);
}

/// Fault injection at every entry point the engine calls: the copy either never reached
/// the failing call and succeeded, or it fails with `Error::Cuda` naming that call. Either
/// way nothing hangs or leaks, no work is left pending, and the next copy works.
#[test]
fn a_fault_at_any_entry_point_ends_cleanly_and_the_next_copy_works() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(6 * MIB as usize + 77, 13);
    let rs = [(0, 3 * MIB + 5), (3 * MIB + 5, 10), (4 * MIB, 2 * MIB + 77)];
    let budget = 3 * MIB; // 3 slabs of 1 MiB: the stream, events and ring all cycle
    let cases: &[(&str, &[u64])] = &[
        ("cuInit", &[1, 2]),
        ("cuDeviceGetCount", &[1, 2]),
        ("cuCtxGetCurrent", &[1]),
        ("cuCtxSetCurrent", &[1, 2]),
        ("cuPointerGetAttributes", &[1, 2, 3]),
        ("cuMemHostAlloc", &[1, 2, 3]),
        ("cuStreamCreate", &[1]),
        ("cuEventCreate", &[1, 3]),
        ("cuMemcpyHtoDAsync_v2", &[1, 2, 5]),
        ("cuEventRecord", &[1, 4]),
        ("cuEventQuery", &[1, 3, 6]),
        ("cuEventSynchronize", &[1, 2]),
        ("cuStreamSynchronize", &[1]),
    ];
    let mut hit = 0;
    for &(name, nths) in cases {
        for &nth in nths {
            cuda::release_staging().unwrap();
            let what = format!("{name} failing at call {nth}");
            let dests = destinations(f, &rs);
            let before = f.calls(name);
            let code = if name == "cuMemHostAlloc" { 1 } else { 999 };
            // No current context on the copying thread: the engine binds and restores.
            let (r, _) = copy_with(
                &m,
                &own(&dests.reqs),
                &dests.reqs,
                opts(budget, 2, false),
                None,
                move || fake().fail(name, nth, code, 1),
            );
            let reached = f.calls(name) >= before + nth;
            let findings = f.take_findings();
            (f.reset)();
            match r {
                Ok(out) => {
                    assert!(!reached, "{what}: the failing call was made, yet no error");
                    assert_eq!(out, Outcome::Done);
                    dests.check(f, &data, &what);
                    assert_eq!(findings, "", "{what}");
                }
                Err(e) => {
                    hit += 1;
                    assert!(reached, "{what}: error without the fault: {e}");
                    assert!(
                        matches!(&e, Error::Cuda { call, .. } if call == name),
                        "{what}: the error names another call: {e}"
                    );
                    let msg = e.to_string();
                    assert!(msg.contains("CUDA_ERROR_"), "{what}: {msg}");
                    // Only a failed restore of the caller's context may leave it changed.
                    let allowed = if name == "cuCtxSetCurrent" && nth == 2 {
                        "context-not-restored"
                    } else {
                        "(none)"
                    };
                    for line in findings.lines() {
                        assert!(line.starts_with(allowed), "{what}: {line}");
                    }
                }
            }
            // The next copy works and nothing was left behind.
            dests
                .reqs
                .iter()
                .for_each(|r| f.fill(r.dest, r.nbytes as usize, 0x5a));
            let (r, _) = copy(&m, &dests.reqs, opts(budget, 2, false));
            assert_eq!(r.unwrap(), Outcome::Done, "{what}: the next copy");
            dests.check(f, &data, &format!("{what}, next copy"));
            dests.free(f);
            assert_eq!(f.take_findings(), "", "{what}: next copy");
            cuda::release_staging().unwrap();
            assert_eq!((f.check_leaks)(), 0, "{what}: {}", f.findings());
        }
    }
    assert!(hit >= 25, "only {hit} faults were reached");

    // An error on the stream itself (a copy that fails on the device), reported by the
    // next query or synchronisation.
    let dests = destinations(f, &rs);
    let (r, _) = copy_with(
        &m,
        &own(&dests.reqs),
        &dests.reqs,
        opts(budget, 2, false),
        Some(0),
        || (fake().fail_async)(2, 700),
    );
    let e = r.unwrap_err();
    assert!(
        matches!(&e, Error::Cuda { call, .. }
            if call.starts_with("cuEvent") || call == "cuStreamSynchronize"),
        "{e}"
    );
    assert!(e.to_string().contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{e}");
    assert_eq!(f.take_findings(), "");
    let (r, _) = copy(&m, &dests.reqs, opts(budget, 2, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    dests.check(f, &data, "after a stream error");

    // The error names the call even when the driver cannot name the error.
    let (r, _) = copy_with(
        &m,
        &own(&dests.reqs),
        &dests.reqs,
        opts(budget, 2, false),
        Some(0),
        || {
            let f = fake();
            f.fail("cuMemcpyHtoDAsync_v2", 1, 999, 1);
            f.fail("cuGetErrorName", 1, 999, 0);
            f.fail("cuGetErrorString", 1, 999, 0);
        },
    );
    let e = r.unwrap_err();
    assert!(
        matches!(&e, Error::Cuda { call, .. } if call == "cuMemcpyHtoDAsync_v2"),
        "{e}"
    );
    assert!(e.to_string().contains("999"), "{e}");
    (f.reset)();
    dests.free(f);
    finish(f);
}

/// The calls made only once per device (context retention) fail on a device the process
/// has not used yet.
#[test]
fn a_fault_while_retaining_a_context_ends_cleanly() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(MIB as usize, 17);
    for (name, dev) in [("cuDeviceGet", 7), ("cuDevicePrimaryCtxRetain", 6)] {
        f.bind(dev);
        let mut p = 0u64;
        // SAFETY: a valid out-pointer; `dev`'s context is current.
        assert_eq!(unsafe { (f.mem_alloc)(&mut p, 4096) }, 0);
        let req = [CopyRequest {
            file_offset: 9,
            nbytes: 4096,
            dest: p,
        }];
        let o = CudaOptions {
            device: dev as usize,
            ..opts(2 * MIB, 1, false)
        };
        let (r, _) = copy_with(&m, &own(&req), &req, o, Some(0), move || {
            fake().fail(name, 1, 999, 1)
        });
        let e = r.unwrap_err();
        assert!(
            matches!(&e, Error::Cuda { call, .. } if call == name),
            "{e}"
        );
        (f.reset)();
        let (r, _) = copy(&m, &req, o);
        assert_eq!(r.unwrap(), Outcome::Done);
        assert_eq!(f.read(p, 4096), &data[9..4105]);
        f.bind(dev);
        assert_eq!((f.mem_free)(p), 0);
    }
    finish(f);
}

/// A driver that refuses to free a staging resource: `release_staging` names the call,
/// keeps the resource, and frees it on the next call.
#[test]
fn a_fault_while_freeing_staging_is_reported_and_retried() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(2 * MIB as usize, 19);
    let dests = destinations(f, &[(0, 2 * MIB)]);
    for name in ["cuEventDestroy_v2", "cuStreamDestroy_v2", "cuMemFreeHost"] {
        let (r, _) = copy(&m, &dests.reqs, opts(4 * MIB, 2, false));
        assert_eq!(r.unwrap(), Outcome::Done);
        f.fail(name, 1, 999, 1);
        let e = cuda::release_staging().unwrap_err();
        assert!(
            matches!(&e, Error::Cuda { call, .. } if call == name),
            "{e}"
        );
        (f.reset)();
        assert!(
            cuda::release_staging().unwrap(),
            "{name}: the kept resource is freed"
        );
        for what in ["pinned", "streams", "events"] {
            assert_eq!(f.stat(what), 0, "{name}: {what}");
        }
    }
    // A budget change frees the old ring first; a failure there is reported too.
    let (r, _) = copy(&m, &dests.reqs, opts(4 * MIB, 2, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    let (r, _) = copy_with(
        &m,
        &own(&dests.reqs),
        &dests.reqs,
        opts(8 * MIB, 2, false),
        Some(0),
        || fake().fail("cuMemFreeHost", 1, 999, 1),
    );
    let e = r.unwrap_err();
    assert!(
        matches!(&e, Error::Cuda { call, .. } if call == "cuMemFreeHost"),
        "{e}"
    );
    (f.reset)();
    let (r, _) = copy(&m, &dests.reqs, opts(8 * MIB, 2, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    dests.check(f, &data, "after a failed free");
    dests.free(f);
    finish(f);
}

/// Two copies at once, and a third thread asking for the staging state meanwhile: all
/// finish, and each copy is complete.
#[test]
fn concurrent_copies_and_staging_queries_all_finish() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(12 * MIB as usize, 23);
    let a = destinations(f, &[(0, 6 * MIB), (6 * MIB, 6 * MIB)]);
    let b = destinations(f, &[(1, 5 * MIB), (7 * MIB, 5 * MIB)]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = cuda::staging_allocated();
                n += 1;
            }
            n
        })
    };
    let (tx, rx) = mpsc::channel();
    for reqs in [a.reqs.clone(), b.reqs.clone()] {
        let (tx, m) = (tx.clone(), m.clone());
        std::thread::spawn(move || {
            fake().bind(0);
            let mut cb = |_: u64, _: u64| {
                std::thread::sleep(Duration::from_millis(1));
                true
            };
            // SAFETY: live device buffers sized to their requests, disjoint from the
            // other copy's.
            let r = unsafe {
                cuda::copy_to_cuda(&m, &own(&reqs), &reqs, opts(2 * MIB, 2, false), &mut cb)
            };
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
    }
    for _ in 0..2 {
        let r = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a copy hung");
        assert_eq!(r.unwrap(), Outcome::Done);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(poller.join().unwrap() > 0);
    assert_eq!(f.stat("pending"), 0);
    a.check(f, &data, "first");
    b.check(f, &data, "second");
    a.free(f);
    b.free(f);
    finish(f);
}

/// Destinations from PyTorch's other allocators pass the pointer check: VMM ranges
/// (`expandable_segments`: one reservation mapped piece by piece, a tensor may span two
/// pieces) and stream-ordered pool allocations (`cudaMallocAsync`). Anything that is not
/// memory of the device, wholly, is refused before a byte is copied.
#[test]
fn destinations_from_every_allocator_pass_and_bad_ones_are_refused() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(8 * MIB as usize, 29);
    let o = opts(4 * MIB, 2, false);
    f.bind(0);

    // expandable_segments: 8 MiB reserved, two 2 MiB pieces mapped from two handles.
    let gran = 2 * MIB as usize;
    let mut base = 0u64;
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { (f.reserve)(&mut base, 4 * gran, 0, 0, 0) }, 0);
    let prop = AllocProp {
        type_: 1,
        handle_types: 0,
        location_type: 1,
        location_id: 0,
        win32: std::ptr::null_mut(),
        flags: [0; 8],
    };
    let mut handles = [0u64; 2];
    for (i, h) in handles.iter_mut().enumerate() {
        // SAFETY: valid out-pointer and property struct.
        assert_eq!(unsafe { (f.create)(h, gran, &prop, 0) }, 0);
        assert_eq!((f.map)(base + (i * gran) as u64, gran, 0, *h, 0), 0);
    }
    let access = AccessDesc {
        location_type: 1,
        location_id: 0,
        flags: 3,
    };
    // SAFETY: one valid descriptor.
    assert_eq!(unsafe { (f.set_access)(base, 2 * gran, &access, 1) }, 0);
    let span = CopyRequest {
        file_offset: 123,
        nbytes: MIB + 4567,
        dest: base + (gran as u64 - MIB / 2), // across the two pieces
    };
    // cudaMallocAsync: a pool allocation.
    let mut pool = 0u64;
    // SAFETY: valid out-pointer; the null stream is the legacy default stream.
    let r = unsafe { (f.alloc_async)(&mut pool, 3 * MIB as usize, std::ptr::null_mut()) };
    assert_eq!(r, 0);
    let pooled = CopyRequest {
        file_offset: 4 * MIB + 1,
        nbytes: 3 * MIB,
        dest: pool,
    };
    let (r, _) = copy(&m, &[span, pooled], o);
    assert_eq!(r.unwrap(), Outcome::Done);
    for q in [span, pooled] {
        let want = &data[q.file_offset as usize..(q.file_offset + q.nbytes) as usize];
        assert!(f.read(q.dest, q.nbytes as usize) == want);
    }

    // Refused: past the mapped pieces into the unmapped rest of the reservation; past the
    // end of an allocation; host memory; another device's memory; freed memory.
    let host = vec![0u8; 4096];
    let alloc = f.alloc(0, 4096, 0);
    let other = f.alloc(1, 4096, 0);
    let freed = f.alloc(0, 4096, 0);
    f.free(freed);
    let bad = [
        (
            base + 2 * gran as u64 - 100,
            200,
            "into an unmapped part of a VMM reservation",
        ),
        (alloc + 100, 4096, "past the end of an allocation"),
        (host.as_ptr() as u64, 4096, "host memory"),
        (other, 4096, "memory of another device"),
        (freed, 4096, "freed memory"),
    ];
    // A driver that reports no ranges: the check falls back to the first and last byte
    // (which still catches each of these).
    for ranges in [1.0, 0.0] {
        f.config("range_attributes", ranges);
        for (dest, n, what) in bad {
            let req = [CopyRequest {
                file_offset: 0,
                nbytes: n,
                dest,
            }];
            let (r, calls) = copy(&m, &req, o);
            let e = r.unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{what}: {e}");
            assert!(
                e.to_string().contains("not memory of CUDA device 0"),
                "{what}: {e}"
            );
            assert!(calls.is_empty(), "{what}: refused before progress started");
        }
        let (r, _) = copy(&m, &[span, pooled], o);
        assert_eq!(r.unwrap(), Outcome::Done, "range attributes {ranges}");
    }
    // A device that does not exist.
    let (r, _) = copy(&m, &[span], CudaOptions { device: 8, ..o });
    let e = r.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("cuda:0 to cuda:7"), "{e}");
    assert!(host.iter().all(|&b| b == 0));
    assert_eq!(f.read(alloc, 4096), vec![0u8; 4096]);

    f.bind(0);
    assert_eq!((f.free_async)(pool, std::ptr::null_mut()), 0);
    assert_eq!((f.unmap)(base, 2 * gran), 0);
    for h in handles {
        assert_eq!((f.release)(h), 0);
    }
    assert_eq!((f.address_free)(base, 4 * gran), 0);
    f.free(alloc);
    f.bind(1);
    assert_eq!((f.mem_free)(other), 0);
    finish(f);
}

/// A progress callback that starts another copy, or frees the staging, on the copying
/// thread gets an error instead of waiting for itself forever; the outer copy completes.
#[test]
fn a_copy_or_release_from_inside_a_copy_is_refused_not_deadlocked() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(40 * MIB as usize, 37);
    let dests = destinations(f, &[(0, 40 * MIB)]);
    let inner = destinations(f, &[(5, 1000)]);
    let (tx, rx) = mpsc::channel();
    let (m2, reqs, inner_reqs) = (m.clone(), dests.reqs.clone(), inner.reqs.clone());
    std::thread::spawn(move || {
        fake().bind(0);
        let mut errors = Vec::new();
        let mut cb = |done: u64, _: u64| {
            if done > 0 && errors.is_empty() {
                errors.push(cuda::release_staging().map(|_| ()).unwrap_err().to_string());
                let mut quiet = |_: u64, _: u64| true;
                // SAFETY: a live device buffer sized to its request (never written here).
                let r = unsafe {
                    cuda::copy_to_cuda(
                        &m2,
                        &own(&inner_reqs),
                        &inner_reqs,
                        opts(4 * MIB, 1, false),
                        &mut quiet,
                    )
                };
                errors.push(r.unwrap_err().to_string());
            }
            true
        };
        // SAFETY: live device buffers sized to their requests.
        let r = unsafe {
            cuda::copy_to_cuda(&m2, &own(&reqs), &reqs, opts(4 * MIB, 2, false), &mut cb)
        };
        let _ = tx.send((r.map_err(|e| e.to_string()), errors));
    });
    let (r, errors) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("deadlocked");
    assert_eq!(r.unwrap(), Outcome::Done);
    assert_eq!(errors.len(), 2);
    for e in errors {
        assert!(e.contains("from inside a GPU load"), "{e}");
    }
    dests.check(f, &data, "outer copy");
    dests.free(f);
    inner.free(f);
    finish(f);
}

/// Cancelling from the progress callback stops the copy, waits for what was queued, and
/// leaves the engine ready for the next copy.
#[test]
fn a_cancelled_copy_leaves_nothing_pending() {
    let (_g, f) = session();
    let (_d, m, data) = file_with(40 * MIB as usize, 31);
    let dests = destinations(f, &[(0, 40 * MIB)]);
    let (tx, rx) = mpsc::channel();
    let (m2, reqs) = (m.clone(), dests.reqs.clone());
    std::thread::spawn(move || {
        let f = fake();
        f.bind(0);
        let mut n = 0;
        let mut cb = |_: u64, _: u64| {
            n += 1;
            n < 2
        };
        (f.enter)();
        // SAFETY: live device buffers sized to their requests.
        let r = unsafe {
            cuda::copy_to_cuda(&m2, &own(&reqs), &reqs, opts(4 * MIB, 3, false), &mut cb)
        };
        (f.leave)();
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let r = rx.recv_timeout(Duration::from_secs(60)).expect("hung");
    assert_eq!(r.unwrap(), Outcome::Cancelled);
    assert_eq!(f.take_findings(), "");
    let (r, _) = copy(&m, &dests.reqs, opts(4 * MIB, 3, false));
    assert_eq!(r.unwrap(), Outcome::Done);
    dests.check(f, &data, "after cancel");
    dests.free(f);
    finish(f);
}

/// The pointer check costs two driver calls per destination buffer, however many requests
/// write into it: a `Shard(1)` slice of a `[50000, 16]` weight is 50,000 runs into one
/// tensor and makes one check, not 50,000. A request outside every buffer named is
/// refused before anything is read.
#[test]
fn destinations_are_checked_once_per_buffer_not_per_request() {
    let (_g, f) = session();
    let rows = 50_000u64;
    let (_d, m, data) = file_with((rows * 64) as usize, 41);
    let dest = f.alloc(0, (rows * 32) as usize, 0);
    let reqs: Vec<CopyRequest> = (0..rows)
        .map(|i| CopyRequest {
            file_offset: i * 64 + 16,
            nbytes: 32,
            dest: dest + i * 32,
        })
        .collect();
    let buffer = [Extent {
        addr: dest,
        nbytes: rows * 32,
    }];
    let before = f.calls("cuPointerGetAttributes");
    let (r, _) = copy_with(&m, &buffer, &reqs, opts(4 * MIB, 2, false), Some(0), || {});
    assert_eq!(r.unwrap(), Outcome::Done);
    let checks = f.calls("cuPointerGetAttributes") - before;
    assert!(
        checks <= 2,
        "{checks} pointer checks for one destination buffer"
    );
    let got = f.read(dest, (rows * 32) as usize);
    for i in 0..rows as usize {
        assert!(
            got[i * 32..i * 32 + 32] == data[i * 64 + 16..i * 64 + 48],
            "row {i}"
        );
    }

    // A request that writes past the buffers it names.
    let stray = [CopyRequest {
        file_offset: 0,
        nbytes: 64,
        dest: dest + rows * 32 - 32,
    }];
    let (r, calls) = copy_with(&m, &buffer, &stray, opts(4 * MIB, 2, false), Some(0), || {});
    let e = r.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("outside every destination"), "{e}");
    assert!(calls.is_empty(), "refused before progress started");
    f.free(dest);
    finish(f);
}

// ---------------------------------------------------------------------------------------
// The reverse path: device -> pinned staging ring -> file (saving)
// ---------------------------------------------------------------------------------------

use _core::transfer::cuda::CudaWriteOptions;
use _core::transfer::WriteRequest;

/// What a write returns: the result (outcome and CRCs) and the progress calls.
type Wrote = (Result<(Outcome, Vec<u32>), Error>, Vec<(u64, u64)>);

/// Runs one write of `reqs` from the device buffers `sources` to `path` on a fresh
/// thread with device `torch_dev`'s context current, after `arm`, watched by the fake (as
/// `copy_with`).
fn write_with(
    path: &std::path::Path,
    sources: &[Extent],
    reqs: &[WriteRequest],
    opts: CudaWriteOptions,
    torch_dev: Option<i32>,
    arm: impl FnOnce() + Send + 'static,
) -> Wrote {
    let f = fake();
    let (tx, rx) = mpsc::channel();
    let (path, sources, reqs) = (path.to_path_buf(), sources.to_vec(), reqs.to_vec());
    std::thread::spawn(move || {
        if let Some(d) = torch_dev {
            f.bind(d);
        }
        arm();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut calls = Vec::new();
        let me = std::thread::current().id();
        let mut cb = |d: u64, t: u64| {
            assert_eq!(
                std::thread::current().id(),
                me,
                "progress off the calling thread"
            );
            calls.push((d, t));
            true
        };
        (f.enter)();
        // SAFETY: every source is live device memory of the fake that nothing writes
        // during the call.
        let r = unsafe { cuda::write_from_cuda(&file, &path, &sources, &reqs, opts, &mut cb) };
        (f.leave)();
        let _ = tx.send((r, calls));
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the write hung (or its thread panicked)")
}

fn wopts(budget: u64, writers: usize) -> CudaWriteOptions {
    CudaWriteOptions {
        device: 0,
        budget: Some(budget),
        writers: Some(writers),
    }
}

/// Device buffers holding `data`'s `ranges`, and requests writing each to the file at
/// its own offset, records separated by 13-byte gaps, in reverse order of the ranges.
struct Sources {
    extents: Vec<Extent>,
    reqs: Vec<WriteRequest>,
    /// `(offset in data, len)` of each request.
    ranges: Vec<(u64, u64)>,
}

fn sources(f: &Fake, data: &[u8], ranges: &[(u64, u64)]) -> Sources {
    let mut extents = Vec::new();
    let mut reqs = Vec::new();
    let mut at = 13u64;
    for &(off, n) in ranges.iter().rev() {
        let p = f.alloc(0, n.max(1) as usize, 0);
        let bytes = &data[off as usize..(off + n) as usize];
        if n > 0 {
            // SAFETY: `bytes` holds `n` bytes; `p` is device memory of at least `n` bytes.
            assert_eq!(unsafe { (f.htod)(p, bytes.as_ptr().cast(), n as usize) }, 0);
        }
        extents.push(Extent { addr: p, nbytes: n });
        reqs.push(WriteRequest {
            src: p,
            nbytes: n,
            file_offset: at,
        });
        at += n + 13;
    }
    let mut ranges = ranges.to_vec();
    ranges.reverse();
    Sources {
        extents,
        reqs,
        ranges,
    }
}

impl Sources {
    fn check(&self, data: &[u8], path: &std::path::Path, crcs: &[u32], what: &str) {
        let got = std::fs::read(path).unwrap();
        assert_eq!(crcs.len(), self.reqs.len(), "{what}");
        for ((r, &(off, n)), &crc) in self.reqs.iter().zip(&self.ranges).zip(crcs) {
            let want = &data[off as usize..(off + n) as usize];
            let at = r.file_offset as usize;
            assert!(
                got[at..at + n as usize] == *want,
                "{what}: bytes {off}+{n} differ"
            );
            assert_eq!(crc, crc32fast::hash(want), "{what}: crc of {off}+{n}");
        }
    }

    fn free(self, f: &Fake) {
        for e in self.extents {
            f.free(e.addr);
        }
    }
}

#[test]
fn a_write_from_cuda_lands_every_byte_with_its_crc() {
    let (_g, f) = session();
    let (d, _m, data) = file_with(24 * MIB as usize + 1234, 43);
    let mut rs = ranges(data.len() as u64);
    rs.push((100, 0));
    let src = sources(f, &data, &rs);
    let total: u64 = rs.iter().map(|r| r.1).sum();
    let out = d.path().join("out.bin");
    for budget in [1, 3 * MIB, 8 * MIB, 64 * MIB] {
        for writers in [1, 2, 8] {
            let what = format!("budget {budget}, {writers} writers");
            let (r, calls) = write_with(
                &out,
                &src.extents,
                &src.reqs,
                wopts(budget, writers),
                Some(0),
                || {},
            );
            let (outcome, crcs) = r.unwrap();
            assert_eq!(outcome, Outcome::Done, "{what}");
            src.check(&data, &out, &crcs, &what);
            assert_eq!(calls.first(), Some(&(0, total)), "{what}");
            assert_eq!(calls.last(), Some(&(total, total)), "{what}");
            assert_eq!(f.take_findings(), "", "{what}");
        }
    }
    // Loads and saves share the staging resources: one ring, one stream per device.
    assert!(f.calls("cuStreamCreate") <= 1 + 1, "streams are reused");
    src.free(f);
    finish(f);
}

#[test]
fn a_fault_during_a_write_from_cuda_ends_cleanly_and_the_next_write_works() {
    let (_g, f) = session();
    let (d, _m, data) = file_with(6 * MIB as usize + 77, 47);
    let rs = [(0, 3 * MIB + 5), (3 * MIB + 5, 10), (4 * MIB, 2 * MIB + 77)];
    let src = sources(f, &data, &rs);
    let out = d.path().join("out.bin");
    let budget = 3 * MIB;
    let cases: &[(&str, &[u64])] = &[
        ("cuCtxSetCurrent", &[1]),
        ("cuPointerGetAttributes", &[1, 3]),
        ("cuMemHostAlloc", &[1, 2]),
        ("cuStreamCreate", &[1]),
        ("cuEventCreate", &[1, 3]),
        ("cuMemcpyDtoHAsync_v2", &[1, 2, 5]),
        ("cuEventRecord", &[1, 4]),
        ("cuEventQuery", &[1, 3, 6]),
        ("cuEventSynchronize", &[1, 2]),
        ("cuStreamSynchronize", &[1]),
    ];
    let mut hit = 0;
    for &(name, nths) in cases {
        for &nth in nths {
            cuda::release_staging().unwrap();
            let what = format!("{name} failing at call {nth}");
            let before = f.calls(name);
            let code = if name == "cuMemHostAlloc" { 1 } else { 999 };
            let (r, _) = write_with(
                &out,
                &src.extents,
                &src.reqs,
                wopts(budget, 2),
                None,
                move || fake().fail(name, nth, code, 1),
            );
            let reached = f.calls(name) >= before + nth;
            let findings = f.take_findings();
            (f.reset)();
            match r {
                Ok((outcome, crcs)) => {
                    assert!(!reached, "{what}: the failing call was made, yet no error");
                    assert_eq!(outcome, Outcome::Done);
                    src.check(&data, &out, &crcs, &what);
                }
                Err(e) => {
                    hit += 1;
                    assert!(reached, "{what}: error without the fault: {e}");
                    assert!(
                        matches!(&e, Error::Cuda { call, .. } if call == name),
                        "{what}: the error names another call: {e}"
                    );
                }
            }
            assert_eq!(findings, "", "{what}");
            // The staging was given back whole: the next write works, and frees cleanly.
            let (r, _) = write_with(
                &out,
                &src.extents,
                &src.reqs,
                wopts(budget, 2),
                Some(0),
                || {},
            );
            let (outcome, crcs) = r.unwrap();
            assert_eq!(outcome, Outcome::Done, "{what}: the next write");
            src.check(&data, &out, &crcs, &format!("{what}, next write"));
            assert_eq!(f.take_findings(), "", "{what}: next write");
            cuda::release_staging().unwrap();
            assert_eq!(cuda::staging_allocated(), None, "{what}");
        }
    }
    assert!(hit >= 15, "only {hit} faults were reached");

    // A copy that fails on the stream, reported by the next query or synchronisation.
    let (r, _) = write_with(
        &out,
        &src.extents,
        &src.reqs,
        wopts(budget, 2),
        Some(0),
        || (fake().fail_async)(2, 700),
    );
    let e = r.unwrap_err();
    assert!(e.to_string().contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{e}");
    assert_eq!(f.take_findings(), "");
    let (r, _) = write_with(
        &out,
        &src.extents,
        &src.reqs,
        wopts(budget, 2),
        Some(0),
        || {},
    );
    src.check(&data, &out, &r.unwrap().1, "after a stream error");
    src.free(f);
    finish(f);
}

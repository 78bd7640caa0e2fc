//! The test control API: `fakecuda_*` exports (configuration, fault injection, counters,
//! findings, watched calls, leak checks). `tests/fakecuda/fakecuda.py` wraps them.

use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

// ---------------------------------------------------------------------------------------
// Test control: fakecuda_*
// ---------------------------------------------------------------------------------------

/// # Safety
/// `s` must be null or a NUL-terminated string.
pub(crate) unsafe fn cstr<'a>(s: *const c_char) -> Option<&'a str> {
    if s.is_null() {
        return None;
    }
    // SAFETY: caller's contract.
    unsafe { CStr::from_ptr(s) }.to_str().ok()
}

/// Clears injected faults, the stub mode, findings and call counts (live objects stay:
/// they belong to the process, like the engine's cached ring).
#[no_mangle]
pub extern "C" fn fakecuda_reset() {
    let mut st = state();
    st.faults.clear();
    st.async_fault = None;
    st.stub = 0;
    st.findings.clear();
    st.calls.clear();
    FINDINGS.store(0, Ordering::SeqCst);
}

/// Sets a configuration key (see `Config::set`; also `initialized` = 0 to forget `cuInit`).
/// Returns 0, or -1 for an unknown key.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_config(key: *const c_char, value: f64) -> c_int {
    // SAFETY: caller passes a C string.
    let Some(key) = (unsafe { cstr(key) }) else {
        return -1;
    };
    let mut st = state();
    if key == "initialized" {
        st.initialized = value != 0.0;
        return 0;
    }
    if st.cfg.set(key, value) {
        0
    } else {
        -1
    }
}

/// Makes calls `nth .. nth + count` (1-based, counted from now; `count` 0 = all from the
/// nth on) of entry point `name` fail with `code`.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_fail(
    name: *const c_char,
    nth: u64,
    code: CUresult,
    count: u64,
) -> c_int {
    // SAFETY: caller passes a C string.
    let Some(name) = (unsafe { cstr(name) }) else {
        return -1;
    };
    let mut st = state();
    let from = st.calls.get(name).copied().unwrap_or(0);
    st.faults.push(Fault {
        name: name.to_string(),
        from,
        nth: nth.max(1),
        count,
        code,
    });
    0
}

/// Makes the `nth` async copy executed from now fail on its stream with `code`: it copies
/// nothing, and the next query or synchronisation of that stream returns `code`.
#[no_mangle]
pub extern "C" fn fakecuda_fail_async(nth: u64, code: CUresult) {
    let base = COPIES.load(Ordering::SeqCst);
    state().async_fault = Some((base + nth.max(1), code));
}

/// Every entry point returns `code` (34: a stub driver); 0 turns it off.
#[no_mangle]
pub extern "C" fn fakecuda_stub(code: CUresult) {
    state().stub = code;
}

/// Calls of entry point `name` since the last reset.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_calls(name: *const c_char) -> u64 {
    // SAFETY: caller passes a C string.
    let Some(name) = (unsafe { cstr(name) }) else {
        return 0;
    };
    state().calls.get(name).copied().unwrap_or(0)
}

/// Counters: `streams`, `events`, `pinned`, `pinned_bytes`, `device_allocs` (cuMemAlloc
/// and pool allocations), `mappings`, `reservations`, `handles`, `pending`, `copies`,
/// `bytes_copied`, `findings`, `stream_threads`, `busy_us` (time stream threads spent
/// executing copies). Unknown names give `u64::MAX`.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_stat(name: *const c_char) -> u64 {
    // SAFETY: caller passes a C string.
    let Some(name) = (unsafe { cstr(name) }) else {
        return u64::MAX;
    };
    let st = state();
    match name {
        "streams" => st.streams.len() as u64,
        "events" => st.events.len() as u64,
        "pinned" => st.pinned.len() as u64,
        "pinned_bytes" => st.pinned_bytes,
        "device_allocs" => st
            .regions
            .values()
            .filter(|r| r.kind != Kind::Mapped)
            .count() as u64,
        "mappings" => st
            .regions
            .values()
            .filter(|r| r.kind == Kind::Mapped)
            .count() as u64,
        "reservations" => st.reservations.len() as u64,
        "handles" => st.phys.len() as u64,
        "pending" => PENDING.load(Ordering::SeqCst),
        "copies" => COPIES.load(Ordering::SeqCst),
        "bytes_copied" => BYTES.load(Ordering::SeqCst),
        "findings" => FINDINGS.load(Ordering::SeqCst),
        "stream_threads" => STREAM_THREADS.load(Ordering::SeqCst),
        "busy_us" => BUSY_NS.load(Ordering::SeqCst) / 1000,
        _ => u64::MAX,
    }
}

/// Writes the findings, one `class: message` per line, into `buf` (at most `cap` bytes,
/// NUL-terminated when there is room); returns the length of the whole text.
#[no_mangle]
pub unsafe extern "C" fn fakecuda_findings(buf: *mut c_char, cap: usize) -> usize {
    let text: String = state()
        .findings
        .iter()
        .map(|(c, m)| format!("{}: {m}\n", c.name()))
        .collect();
    if !buf.is_null() && cap > 0 {
        let n = text.len().min(cap - 1);
        // SAFETY: caller's buffer holds `cap` bytes; we write `n + 1 <= cap`.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast(), n);
            *buf.add(n) = 0;
        }
    }
    text.len()
}

/// Number of findings of `class` (null: all).
#[no_mangle]
pub unsafe extern "C" fn fakecuda_count_findings(class: *const c_char) -> u64 {
    // SAFETY: caller passes a C string or null.
    let class = unsafe { cstr(class) };
    state()
        .findings
        .iter()
        .filter(|(c, _)| class.is_none_or(|k| k == c.name()))
        .count() as u64
}

#[no_mangle]
pub extern "C" fn fakecuda_clear_findings() {
    state().findings.clear();
    FINDINGS.store(0, Ordering::SeqCst);
}

/// Marks the start of a watched call on this thread: remembers the current context.
#[no_mangle]
pub extern "C" fn fakecuda_enter() {
    let c = current();
    WATCH.with(|w| w.borrow_mut().push(c));
}

/// Marks the end of a watched call: the current context must be the one at
/// `fakecuda_enter`, and no work may be pending on any stream. Returns the number of
/// findings this recorded.
#[no_mangle]
pub extern "C" fn fakecuda_leave() -> u64 {
    let expected = WATCH.with(|w| w.borrow_mut().pop()).unwrap_or(0);
    let now = current();
    let pending = PENDING.load(Ordering::SeqCst);
    let mut st = state();
    let mut n = 0;
    if now != expected {
        st.find(
            Class::ContextNotRestored,
            format!("the current context was {expected:#x} before the call and {now:#x} after"),
        );
        n += 1;
    }
    if pending > 0 {
        st.find(
            Class::PendingAtReturn,
            format!("{pending} stream operation(s) still pending when the call returned"),
        );
        n += 1;
    }
    n
}

/// Records a `leak` finding for every live stream, event, pinned allocation, device
/// allocation, mapping, reservation and allocation handle; returns how many.
#[no_mangle]
pub extern "C" fn fakecuda_check_leaks() -> u64 {
    let mut st = state();
    let mut found = Vec::new();
    for (what, n) in [
        ("stream", st.streams.len()),
        ("event", st.events.len()),
        ("pinned allocation", st.pinned.len()),
        (
            "device allocation",
            st.regions
                .values()
                .filter(|r| r.kind != Kind::Mapped)
                .count(),
        ),
        (
            "VMM mapping",
            st.regions
                .values()
                .filter(|r| r.kind == Kind::Mapped)
                .count(),
        ),
        ("address reservation", st.reservations.len()),
        ("allocation handle", st.phys.len()),
    ] {
        if n > 0 {
            found.push(format!("{n} {what}(s) still alive"));
        }
    }
    let k = found.len() as u64;
    for f in found {
        st.find(Class::Leak, f);
    }
    k
}

/// Waits until every stream is idle (tests that provoke misuse let the work drain).
#[no_mangle]
pub extern "C" fn fakecuda_wait_idle() {
    let streams: Vec<_> = state().streams.values().cloned().collect();
    for s in streams {
        let mut q = s.lock();
        while !q.ops.is_empty() || q.busy {
            q = s.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
    // Destroyed streams drain on their own; wait for those too.
    while PENDING.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
}

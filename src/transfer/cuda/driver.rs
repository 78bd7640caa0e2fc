//! Driver glue: loading the driver (`libcuda.so`, `nvcuda.dll`) at run time (cudarc `dynamic-loading`), `cuInit`,
//! contexts, turning driver errors and cudarc's panics into `Error`s, and checking that
//! destinations are device memory. Everything that talks to the driver outside of the
//! staging resources (`staging.rs`, `ring.rs`) is here.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use crate::error::{panic_message, Error, Result};
use crate::transfer::Extent;

/// Whether a CUDA driver can be loaded and sees at least one device. Never panics.
pub fn is_available() -> bool {
    matches!(device_count(), Ok(n) if n > 0)
}

/// Number of visible CUDA devices; 0 when there is no driver, no device or a stub driver.
pub fn device_count() -> Result<usize> {
    guarded(|| match init() {
        Ok(()) => {
            let n = result::device::get_count().map_err(cu("cuDeviceGetCount"))?;
            Ok(usize::try_from(n).unwrap_or(0))
        }
        Err(Error::CudaUnavailable(_)) => Ok(0),
        Err(e) => Err(e),
    })
}

/// Runs `f`, turning a panic into an error: cudarc's panics about a missing driver library
/// or symbol become `Error::Cuda`, any other panic is a bug of ours (`Error::Internal`).
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(panic_error(&panic_message(payload.as_ref()))),
    }
}

fn panic_error(msg: &str) -> Error {
    // cudarc 0.19: `panic_no_lib_found` and `load` in driver/sys.
    if msg.starts_with("Unable to dynamically load") || msg.starts_with("Missing symbol") {
        Error::Cuda {
            call: "loading the CUDA driver library".into(),
            message: msg.to_string(),
        }
    } else {
        Error::Internal(msg.to_string())
    }
}

/// Turns a driver error into `Error::Cuda` naming the call.
pub(crate) fn cu(call: &'static str) -> impl Fn(DriverError) -> Error {
    move |e: DriverError| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "CUDA error".into());
        let text = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Error::Cuda {
            call: call.into(),
            message: format!("{name} ({}): {text}", e.0 as u32),
        }
    }
}

/// The driver library's name, for messages (cudarc tries it among others).
const DRIVER_LIBRARY: &str = if cfg!(windows) {
    "nvcuda.dll"
} else {
    "libcuda.so"
};

// A one-time cell that blocks while another thread initialises it (clippy.toml): reached
// only through copies and queries that src/py runs detached from Python.
#[allow(clippy::disallowed_types)]
fn culib_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: `is_culib_present` dlopens the driver library by its usual names and
        // closes it again. Loading a library runs its initialisers: here libcuda's (the
        // NVIDIA driver's own, the code every CUDA program, PyTorch included, runs when it
        // uses the GPU; they take no arguments and have no precondition we could break),
        // or those of whatever library the user's library path offers under the driver's
        // name (trusted as any library on that path is; the test suite's fake driver only
        // sets up Rust statics).
        // Nothing of ours is borrowed or running on other threads' behalf during the call,
        // and a panic inside cudarc is caught.
        catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
    })
}

/// Loads the driver and runs `cuInit`.
fn init() -> Result<()> {
    if !culib_present() {
        return Err(Error::CudaUnavailable(format!(
            "no CUDA driver library ({DRIVER_LIBRARY}) could be loaded; is an NVIDIA driver \
             installed?"
        )));
    }
    match result::init() {
        Ok(()) => Ok(()),
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => {
            Err(Error::CudaUnavailable(format!(
                "the CUDA driver sees no device (CUDA_VISIBLE_DEVICES={:?})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
            )))
        }
        Err(DriverError(sys::CUresult::CUDA_ERROR_STUB_LIBRARY)) => {
            Err(Error::CudaUnavailable(format!(
                "the {DRIVER_LIBRARY} found is a stub library (CUDA_ERROR_STUB_LIBRARY), not \
                 an NVIDIA driver; is the driver installed, and is a CUDA toolkit's stubs \
                 directory on the library path?"
            )))
        }
        Err(e) => Err(cu("cuInit")(e)),
    }
}

/// The primary context of `ordinal`, retained once per process (kept as an address:
/// `CUcontext` is a raw pointer).
pub(crate) fn context(ordinal: usize) -> Result<usize> {
    init()?;
    let n = result::device::get_count().map_err(cu("cuDeviceGetCount"))?;
    let n = usize::try_from(n).unwrap_or(0);
    if ordinal >= n {
        return Err(Error::InvalidArgument(format!(
            "CUDA device {ordinal} does not exist: {n} device(s) visible{}",
            if n > 0 {
                format!(" (cuda:0 to cuda:{})", n - 1)
            } else {
                String::new()
            }
        )));
    }
    // A blocking lock (clippy.toml), held while a primary context is retained: reached only
    // through copies and queries that src/py runs detached from Python.
    #[allow(clippy::disallowed_types)]
    static CONTEXTS: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());
    let mut ctxs = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, c)) = ctxs.iter().find(|(o, _)| *o == ordinal) {
        return Ok(c);
    }
    let dev = result::device::get(ordinal as i32).map_err(cu("cuDeviceGet"))?;
    // SAFETY: `dev` is a valid device handle; the primary context stays retained for the
    // life of the process (never released), so the handle stays valid.
    let ctx =
        unsafe { result::primary_ctx::retain(dev) }.map_err(cu("cuDevicePrimaryCtxRetain"))?;
    ctxs.push((ordinal, ctx as usize));
    Ok(ctx as usize)
}

/// The calling thread's current context, saved when we bind ours and restored after.
pub(crate) struct CurrentContext {
    saved: usize,
    changed: bool,
}

impl CurrentContext {
    /// Makes `ctx` (a context from [`context`], retained for the process) current on this
    /// thread, if it is not already.
    pub(crate) fn bind(ctx: usize) -> Result<CurrentContext> {
        let saved = result::ctx::get_current()
            .map_err(cu("cuCtxGetCurrent"))?
            .map_or(0, |c| c as usize);
        let mut guard = CurrentContext {
            saved,
            changed: false,
        };
        if saved != ctx {
            // SAFETY: `ctx` is a retained primary context, alive for the process.
            unsafe { result::ctx::set_current(ctx as sys::CUcontext) }
                .map_err(cu("cuCtxSetCurrent"))?;
            guard.changed = true;
        }
        Ok(guard)
    }

    /// Restores the saved context, reporting a failure.
    pub(crate) fn restore(mut self) -> Result<()> {
        if !std::mem::take(&mut self.changed) {
            return Ok(());
        }
        // SAFETY: the saved context was current on this thread when we started (or null,
        // which unbinds); we never destroy contexts, so it is still valid unless its owner
        // destroyed it during our call, in which case the driver reports an error.
        unsafe { result::ctx::set_current(self.saved as sys::CUcontext) }
            .map_err(cu("cuCtxSetCurrent"))
    }
}

impl Drop for CurrentContext {
    fn drop(&mut self) {
        if self.changed {
            // SAFETY: as in `restore`; reached only when unwinding or after an early
            // error, where a failure has nowhere to go.
            let _ = unsafe { result::ctx::set_current(self.saved as sys::CUcontext) };
        }
    }
}

/// Runs `f` with `ctx` current on this thread, then restores the caller's context; the
/// first error wins.
pub(crate) fn with_context<T>(ctx: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let bound = CurrentContext::bind(ctx)?;
    let r = f();
    let restored = bound.restore();
    let out = r?;
    restored?;
    Ok(out)
}

/// Checks that `[d.addr, d.addr + d.nbytes)` is device memory of `ordinal`: the attributes
/// of its first byte, then of the start of every further allocation or VMM mapping it
/// spans (`CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`/`_SIZE` give each one's extent;
/// PyTorch's `expandable_segments` maps a segment piece by piece, and a tensor may span
/// pieces). Memory from `cudaMalloc`, VMM mappings and `cudaMallocAsync` pools all report
/// memory type `DEVICE` and the device's ordinal. If the driver reports no range, the last
/// byte is checked instead. A context must be current. Called once per destination buffer
/// (see `transfer::plan::written_extents`), never per request.
pub(crate) fn check_destination(d: Extent, ordinal: usize) -> Result<()> {
    check_device_memory(d, ordinal, "destination")
}

/// [`check_destination`] for any buffer, named `what` in the error ("destination",
/// "source").
pub(crate) fn check_device_memory(d: Extent, ordinal: usize, what: &str) -> Result<()> {
    if d.nbytes == 0 {
        return Ok(());
    }
    let end = d.addr + d.nbytes; // `written_extents` checked that this does not overflow
    let mut at = d.addr;
    let mut steps = 0u32;
    loop {
        let (mem_type, dev, range_start, range_size) = pointer_attributes(at)?;
        if mem_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 || dev != ordinal as i32 {
            return Err(Error::InvalidArgument(format!(
                "{what} {:#x}..+{} is not memory of CUDA device {ordinal} (at byte {}: \
                 memory type {mem_type}, device {dev})",
                d.addr,
                d.nbytes,
                at - d.addr
            )));
        }
        steps += 1;
        match range_start.checked_add(range_size) {
            Some(next) if next > at && steps < 1 << 16 => {
                if next >= end {
                    return Ok(());
                }
                at = next;
            }
            _ if at == end - 1 => return Ok(()),
            _ => at = end - 1,
        }
    }
}

/// `(memory type, device ordinal, range start, range size)` of `addr`; unknown pointers
/// get zeroed attributes instead of an error.
fn pointer_attributes(addr: u64) -> Result<(u32, i32, u64, u64)> {
    let mut mem_type: u32 = 0;
    let mut dev: i32 = -1;
    let mut start: u64 = 0;
    let mut size: usize = 0;
    let mut attrs = [
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    ];
    let mut data: [*mut c_void; 4] = [
        (&mut mem_type as *mut u32).cast(),
        (&mut dev as *mut i32).cast(),
        (&mut start as *mut u64).cast(),
        (&mut size as *mut usize).cast(),
    ];
    // SAFETY: four attributes, each with a pointer to storage of the documented type
    // (`CUmemorytype`: unsigned int; ordinal: int; range start: CUdeviceptr; range size:
    // size_t), all alive for the call.
    unsafe { sys::cuPointerGetAttributes(4, attrs.as_mut_ptr(), data.as_mut_ptr(), addr) }
        .result()
        .map_err(cu("cuPointerGetAttributes"))?;
    Ok((mem_type, dev, start, size as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_of_ours_is_an_internal_error_and_cudarcs_a_driver_error() {
        let e = guarded::<()>(|| panic!("index out of bounds: the len is 3")).unwrap_err();
        assert!(
            matches!(&e, Error::Internal(m) if m.contains("index out of bounds")),
            "{e}"
        );
        assert!(e.to_string().contains("bug in zeroload"), "{e}");
        let e =
            guarded::<()>(|| panic!("Missing symbol cuMemcpyHtoDAsync_v2: undefined")).unwrap_err();
        assert!(
            matches!(&e, Error::Cuda { call, message }
                if call.contains("driver library") && message.contains("cuMemcpyHtoDAsync_v2")),
            "{e}"
        );
        let e = guarded::<()>(|| panic!("Unable to dynamically load the \"cuda\" shared library"))
            .unwrap_err();
        assert!(matches!(e, Error::Cuda { .. }), "{e}");
        assert_eq!(guarded(|| Ok(5)).unwrap(), 5);
    }
}

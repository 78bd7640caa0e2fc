//! Initialisation, devices, primary contexts, pointer attributes (as a real driver
//! reports them for each allocator) and error names.

use std::ffi::{c_char, c_int, c_uint, c_void};

use super::*;

// ---------------------------------------------------------------------------------------
// Initialisation, devices, contexts
// ---------------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guard("cuInit", || {
        let mut st = enter("cuInit", false)?;
        if flags != 0 {
            return Err(INVALID_VALUE);
        }
        if st.cfg.devices <= 0 {
            return Err(NO_DEVICE);
        }
        st.initialized = true;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    guard("cuDriverGetVersion", || {
        let _st = enter("cuDriverGetVersion", false)?;
        // SAFETY: driver contract: an int out-pointer.
        unsafe { out(version, 12080) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    guard("cuDeviceGetCount", || {
        let st = enter("cuDeviceGetCount", true)?;
        // SAFETY: driver contract: an int out-pointer.
        unsafe { out(count, st.cfg.devices.max(0)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard("cuDeviceGet", || {
        let st = enter("cuDeviceGet", true)?;
        if ordinal < 0 || ordinal >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        // SAFETY: driver contract: a CUdevice out-pointer.
        unsafe { out(device, ordinal) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: CUdevice,
) -> CUresult {
    guard("cuDeviceGetAttribute", || {
        let st = enter("cuDeviceGetAttribute", true)?;
        if dev < 0 || dev >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        let v = match attrib {
            1 => 1024, // MAX_THREADS_PER_BLOCK
            16 => 132, // MULTIPROCESSOR_COUNT
            19 => 1,   // CAN_MAP_HOST_MEMORY
            40 => 2,   // ASYNC_ENGINE_COUNT
            41 => 1,   // UNIFIED_ADDRESSING
            75 => 9,   // COMPUTE_CAPABILITY_MAJOR
            76 => 0,   // COMPUTE_CAPABILITY_MINOR
            102 => 1,  // VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
            115 => 1,  // MEMORY_POOLS_SUPPORTED
            _ => 0,
        };
        // SAFETY: driver contract: an int out-pointer.
        unsafe { out(pi, v) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    guard("cuDeviceGetName", || {
        let st = enter("cuDeviceGetName", true)?;
        if dev < 0 || dev >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        if name.is_null() || len <= 0 {
            return Err(INVALID_VALUE);
        }
        let s = format!("fakecuda device {dev}\0");
        let n = s.len().min(len as usize);
        // SAFETY: `name` holds `len` bytes (driver contract); we write at most that,
        // NUL-terminated.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), name.cast(), n);
            *name.add(n - 1) = 0;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    guard("cuDeviceTotalMem_v2", || {
        let st = enter("cuDeviceTotalMem_v2", true)?;
        if dev < 0 || dev >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        // SAFETY: driver contract: a size_t out-pointer.
        unsafe { out(bytes, 80usize << 30) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRetain", || {
        let mut st = enter("cuDevicePrimaryCtxRetain", true)?;
        if dev < 0 || dev >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        // SAFETY: driver contract: a CUcontext out-pointer.
        unsafe { out(pctx, (TAG_CTX | dev as usize) as CUcontext) }?;
        *st.primary_refs.entry(dev).or_insert(0) += 1;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRelease_v2", || {
        let mut st = enter("cuDevicePrimaryCtxRelease_v2", true)?;
        match st.primary_refs.get_mut(&dev) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Ok(())
            }
            _ => {
                st.find(
                    Class::InvalidHandle,
                    format!("cuDevicePrimaryCtxRelease_v2({dev}) without a matching retain"),
                );
                Err(INVALID_CONTEXT)
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    guard("cuCtxGetCurrent", || {
        let _st = enter("cuCtxGetCurrent", true)?;
        // SAFETY: driver contract: a CUcontext out-pointer.
        unsafe { out(pctx, current() as CUcontext) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    guard("cuCtxSetCurrent", || {
        let mut st = enter("cuCtxSetCurrent", true)?;
        let c = ctx as usize;
        if c != 0 && st.ctx_device(c).is_none() {
            st.find(
                Class::InvalidHandle,
                format!("cuCtxSetCurrent({c:#x}): not a retained context"),
            );
            return Err(INVALID_CONTEXT);
        }
        CURRENT.with(|cur| cur.set(c));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    guard("cuCtxGetDevice", || {
        let mut st = enter("cuCtxGetDevice", true)?;
        let (_, d) = need_context(&mut st, "cuCtxGetDevice")?;
        // SAFETY: driver contract: a CUdevice out-pointer.
        unsafe { out(device, d) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    guard("cuCtxSynchronize", || {
        let mut st = enter("cuCtxSynchronize", true)?;
        let (ctx, _) = need_context(&mut st, "cuCtxSynchronize")?;
        let streams: Vec<_> = st
            .streams
            .values()
            .filter(|s| s.ctx == ctx)
            .cloned()
            .collect();
        drop(st);
        let mut err = 0;
        for s in streams {
            let e = s.wait_idle();
            if err == 0 {
                err = e;
            }
        }
        if err != 0 {
            return Err(err);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Pointer attributes, errors
// ---------------------------------------------------------------------------------------

/// What `cuPointerGetAttributes` reports for one address.
#[derive(Default)]
pub(crate) struct Attrs {
    pub(crate) context: usize,
    pub(crate) memory_type: u32,
    pub(crate) device_pointer: u64,
    pub(crate) host_pointer: usize,
    pub(crate) buffer_id: u64,
    pub(crate) device_ordinal: i32,
    pub(crate) range_start: u64,
    pub(crate) range_size: usize,
    pub(crate) mempool: usize,
}

pub(crate) fn attrs_of(st: &State, p: u64) -> Attrs {
    let mut a = attrs_with_range(st, p);
    if !st.cfg.range_attributes {
        a.range_start = 0;
        a.range_size = 0;
    }
    a
}

pub(crate) fn attrs_with_range(st: &State, p: u64) -> Attrs {
    if let Some(r) = st.region_at(p) {
        // As a real driver: memory from cuMemAlloc belongs to the allocating (primary)
        // context; VMM mappings and pool allocations belong to no context. All are device
        // memory of their device; the range is the allocation, or the one mapping.
        return Attrs {
            context: if r.kind == Kind::Alloc {
                TAG_CTX | r.device as usize
            } else {
                0
            },
            memory_type: 2, // CU_MEMORYTYPE_DEVICE
            device_pointer: p,
            host_pointer: 0,
            buffer_id: r.buffer_id,
            device_ordinal: r.device,
            range_start: r.start,
            range_size: r.len as usize,
            mempool: if r.kind == Kind::Pool {
                TAG_POOL | r.device as usize
            } else {
                0
            },
        };
    }
    if let Some(pin) = st.pinned_containing(p as usize, 1) {
        return Attrs {
            context: pin.ctx,
            memory_type: 1, // CU_MEMORYTYPE_HOST
            device_pointer: p,
            host_pointer: p as usize,
            buffer_id: 0,
            device_ordinal: (pin.ctx & !TAG_MASK) as i32,
            range_start: pin.map.addr as u64,
            range_size: pin.len,
            mempool: 0,
        };
    }
    // Unknown (or reserved but unmapped): null values, no error.
    Attrs {
        device_ordinal: -2,
        ..Attrs::default()
    }
}

/// Writes attribute `a` of `v` through `data`.
///
/// # Safety
/// `data` must point to storage of the attribute's documented type.
pub(crate) unsafe fn write_attr(a: c_uint, v: &Attrs, data: *mut c_void) -> bool {
    // SAFETY: caller's contract: `data` has the documented type for `a`.
    unsafe {
        match a {
            1 => data.cast::<usize>().write(v.context),
            2 => data.cast::<u32>().write(v.memory_type),
            3 => data.cast::<u64>().write(v.device_pointer),
            4 => data.cast::<usize>().write(v.host_pointer),
            7 => data.cast::<u64>().write(v.buffer_id),
            9 => data.cast::<i32>().write(v.device_ordinal),
            11 => data.cast::<u64>().write(v.range_start),
            12 => data.cast::<usize>().write(v.range_size),
            17 => data.cast::<usize>().write(v.mempool),
            _ => return false,
        }
    }
    true
}

#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttributes(
    n: c_uint,
    attributes: *const c_uint,
    data: *mut *mut c_void,
    p: CUdeviceptr,
) -> CUresult {
    guard("cuPointerGetAttributes", || {
        let mut st = enter("cuPointerGetAttributes", true)?;
        if n == 0 || attributes.is_null() || data.is_null() {
            return Err(INVALID_VALUE);
        }
        let v = attrs_of(&st, p);
        for i in 0..n as usize {
            // SAFETY: driver contract: `n` attributes and `n` data pointers.
            let (a, d) = unsafe { (*attributes.add(i), *data.add(i)) };
            // SAFETY: driver contract: each data pointer has its attribute's type.
            if d.is_null() || !unsafe { write_attr(a, &v, d) } {
                st.find(
                    Class::Unsupported,
                    format!("cuPointerGetAttributes: attribute {a} is not emulated"),
                );
                return Err(INVALID_VALUE);
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    a: c_uint,
    p: CUdeviceptr,
) -> CUresult {
    guard("cuPointerGetAttribute", || {
        let mut st = enter("cuPointerGetAttribute", true)?;
        let v = attrs_of(&st, p);
        if v.memory_type == 0 || data.is_null() {
            return Err(INVALID_VALUE); // the singular form fails on unknown pointers
        }
        // SAFETY: driver contract: `data` has the attribute's type.
        if !unsafe { write_attr(a, &v, data) } {
            st.find(
                Class::Unsupported,
                format!("cuPointerGetAttribute: attribute {a} is not emulated"),
            );
            return Err(INVALID_VALUE);
        }
        Ok(())
    })
}

pub(crate) fn error_text(
    name: &'static str,
    code: CUresult,
    text: bool,
    p: *mut *const c_char,
) -> CUresult {
    guard(name, || {
        let _st = enter(name, false)?;
        let Some(&(_, n, s)) = ERRORS.iter().find(|(c, _, _)| *c == code) else {
            // SAFETY: driver contract: an out-pointer (null is refused).
            unsafe { out(p, std::ptr::null()) }?;
            return Err(INVALID_VALUE);
        };
        // SAFETY: driver contract: an out-pointer; the strings are 'static.
        unsafe { out(p, if text { s.as_ptr() } else { n.as_ptr() }) }
    })
}

#[no_mangle]
pub extern "C" fn cuGetErrorName(code: CUresult, p: *mut *const c_char) -> CUresult {
    error_text("cuGetErrorName", code, false, p)
}

#[no_mangle]
pub extern "C" fn cuGetErrorString(code: CUresult, p: *mut *const c_char) -> CUresult {
    error_text("cuGetErrorString", code, true, p)
}

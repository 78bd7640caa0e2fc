//! Memory: pinned host allocations (`cuMemHostAlloc`), device memory from
//! `cuMemAlloc_v2`, pools (`cuMemAllocAsync`) and VMM (`cuMemAddressReserve`,
//! `cuMemCreate`, `cuMemMap`, `cuMemSetAccess`), and the shadow buffers that hold device
//! bytes where the host cannot read them through device addresses.

use std::ffi::{c_int, c_uint, c_ulonglong, c_void};
use std::sync::Arc;

use super::*;

/// A host mapping owned by the fake, unmapped on drop.
pub(crate) struct HostMap {
    pub(crate) addr: usize,
    #[cfg_attr(windows, allow(dead_code))] // munmap needs it; VirtualFree does not
    pub(crate) len: usize,
}

impl HostMap {
    /// `len` bytes (rounded up to pages) of fresh memory: zeroed and read-write when
    /// `readable`, else address space that faults on any access, as device addresses
    /// would if the host dereferenced them.
    pub(crate) fn new(len: usize, readable: bool) -> Option<HostMap> {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        let addr = os_map(len, readable)?;
        Some(HostMap { addr, len })
    }
}

#[cfg(unix)]
fn os_map(len: usize, readable: bool) -> Option<usize> {
    let prot = if readable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_NONE
    };
    // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as usize)
}

/// Windows: committed pages (zeroed, backed when first touched) when readable, else a
/// reservation only, which faults on any access.
#[cfg(windows)]
fn os_map(len: usize, readable: bool) -> Option<usize> {
    use windows_sys::Win32::System::Memory::{
        VirtualAlloc, MEM_COMMIT, MEM_RESERVE, PAGE_NOACCESS, PAGE_READWRITE,
    };
    let (kind, protect) = if readable {
        (MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    } else {
        (MEM_RESERVE, PAGE_NOACCESS)
    };
    // SAFETY: a fresh allocation at an address of the system's choosing; nothing else
    // refers to it.
    let p = unsafe { VirtualAlloc(std::ptr::null(), len, kind, protect) };
    (!p.is_null()).then_some(p as usize)
}

impl Drop for HostMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, released once; whoever could still use it holds an Arc.
        #[cfg(unix)]
        unsafe {
            libc::munmap(self.addr as *mut c_void, self.len)
        };
        // SAFETY: as above; MEM_RELEASE frees the whole allocation (size 0).
        #[cfg(windows)]
        unsafe {
            windows_sys::Win32::System::Memory::VirtualFree(
                self.addr as *mut c_void,
                0,
                windows_sys::Win32::System::Memory::MEM_RELEASE,
            )
        };
    }
}

/// A pinned host allocation (`cuMemHostAlloc`). Pending copies hold an `Arc`, so freeing
/// it early is recorded but never makes the fake itself read unmapped memory.
pub(crate) struct Pinned {
    pub(crate) map: HostMap,
    pub(crate) len: usize,
    pub(crate) portable: bool,
    pub(crate) ctx: usize,
}

/// Device bytes: a readable buffer beside the (unreadable) device addresses.
pub(crate) struct Shadow(pub(crate) HostMap);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// `cuMemAlloc_v2`.
    Alloc,
    /// A `cuMemMap` of a `cuMemCreate` handle inside a reserved range.
    Mapped,
    /// `cuMemAllocAsync` from the device's default pool.
    Pool,
}

/// A live range of device memory.
#[derive(Clone)]
pub(crate) struct Region {
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) device: i32,
    pub(crate) kind: Kind,
    /// `None` with `backing` off.
    pub(crate) shadow: Option<Arc<Shadow>>,
    pub(crate) shadow_off: u64,
    pub(crate) buffer_id: u64,
    /// VMM mappings need `cuMemSetAccess` before use.
    pub(crate) accessible: bool,
    /// The address reservation of `Alloc`/`Pool` regions (VMM reservations are separate).
    pub(crate) _va: Option<Arc<HostMap>>,
}

/// A `cuMemCreate` handle.
pub(crate) struct Phys {
    pub(crate) len: u64,
    pub(crate) device: i32,
    pub(crate) shadow: Option<Arc<Shadow>>,
}

/// One piece of a resolved device range: where its bytes live.
pub(crate) struct Piece {
    pub(crate) shadow: Option<Arc<Shadow>>,
    pub(crate) off: u64,
    pub(crate) len: u64,
}

// ---------------------------------------------------------------------------------------
// Host (pinned) memory
// ---------------------------------------------------------------------------------------

pub(crate) fn host_alloc(
    name: &'static str,
    pp: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> Result<(), CUresult> {
    let mut st = enter(name, true)?;
    let (ctx, _) = need_context(&mut st, name)?;
    if pp.is_null() || size == 0 {
        return Err(INVALID_VALUE);
    }
    if flags & !0x7 != 0 {
        st.find(
            Class::Unsupported,
            format!("{name}: flags {flags:#x} are not emulated"),
        );
        return Err(INVALID_VALUE);
    }
    let limit = st.cfg.pinned_limit;
    if limit > 0 && st.pinned_bytes + size as u64 > limit {
        return Err(OUT_OF_MEMORY);
    }
    let map = HostMap::new(size, true).ok_or(OUT_OF_MEMORY)?;
    let addr = map.addr;
    st.pinned.insert(
        addr,
        Arc::new(Pinned {
            map,
            len: size,
            portable: flags & 1 != 0,
            ctx,
        }),
    );
    st.pinned_bytes += size as u64;
    // SAFETY: checked non-null above; driver contract: a pointer out-pointer.
    unsafe { pp.write(addr as *mut c_void) };
    Ok(())
}

#[no_mangle]
pub extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, size: usize, flags: c_uint) -> CUresult {
    guard("cuMemHostAlloc", || {
        host_alloc("cuMemHostAlloc", pp, size, flags)
    })
}

#[no_mangle]
pub extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, size: usize) -> CUresult {
    guard("cuMemAllocHost_v2", || {
        host_alloc("cuMemAllocHost_v2", pp, size, 0)
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    guard("cuMemFreeHost", || {
        let mut st = enter("cuMemFreeHost", true)?;
        // As the real driver, which answers CUDA_ERROR_INVALID_CONTEXT without one.
        need_context(&mut st, "cuMemFreeHost")?;
        let Some(pin) = st.pinned.remove(&(p as usize)) else {
            st.find(
                Class::InvalidHandle,
                format!(
                    "cuMemFreeHost({:#x}): not the start of a live pinned allocation (double \
                     free?)",
                    p as usize
                ),
            );
            return Err(INVALID_VALUE);
        };
        st.pinned_bytes -= pin.len as u64;
        if Arc::strong_count(&pin) > 1 {
            st.find(
                Class::FreedWhilePending,
                format!(
                    "cuMemFreeHost({:#x}) while an async copy from it is pending",
                    p as usize
                ),
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Device memory: cuMemAlloc, pools, VMM
// ---------------------------------------------------------------------------------------

pub(crate) fn new_region(
    st: &mut State,
    size: u64,
    device: i32,
    kind: Kind,
) -> Result<u64, CUresult> {
    // A guard page after each allocation: a copy that runs past its end is caught.
    let va = HostMap::new(size as usize + PAGE, false).ok_or(OUT_OF_MEMORY)?;
    let shadow = if st.cfg.backing {
        Some(Arc::new(Shadow(
            HostMap::new(size as usize, true).ok_or(OUT_OF_MEMORY)?,
        )))
    } else {
        None
    };
    let start = va.addr as u64;
    let buffer_id = st.id();
    st.regions.insert(
        start,
        Region {
            start,
            len: size,
            device,
            kind,
            shadow,
            shadow_off: 0,
            buffer_id,
            accessible: true,
            _va: Some(Arc::new(va)),
        },
    );
    Ok(start)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    guard("cuMemAlloc_v2", || {
        let mut st = enter("cuMemAlloc_v2", true)?;
        let (_, dev) = need_context(&mut st, "cuMemAlloc_v2")?;
        if dptr.is_null() || size == 0 {
            return Err(INVALID_VALUE);
        }
        let p = new_region(&mut st, size as u64, dev, Kind::Alloc)?;
        // SAFETY: checked non-null; driver contract: a CUdeviceptr out-pointer.
        unsafe { out(dptr, p) }
    })
}

pub(crate) fn free_region(
    st: &mut State,
    name: &str,
    p: CUdeviceptr,
    kinds: &[Kind],
) -> Result<(), CUresult> {
    match st.regions.get(&p) {
        Some(r) if kinds.contains(&r.kind) => {}
        _ => {
            st.find(
                Class::InvalidHandle,
                format!("{name}({p:#x}): not the start of a live allocation (double free?)"),
            );
            return Err(INVALID_VALUE);
        }
    }
    let r = st.regions.remove(&p).expect("checked");
    if let Some((s, e)) = st.inflight_overlap(r.start, r.start + r.len) {
        st.find(
            Class::FreedWhilePending,
            format!("{name}({p:#x}) while an async copy into {s:#x}..{e:#x} is pending"),
        );
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(p: CUdeviceptr) -> CUresult {
    guard("cuMemFree_v2", || {
        let mut st = enter("cuMemFree_v2", true)?;
        need_context(&mut st, "cuMemFree_v2")?;
        free_region(&mut st, "cuMemFree_v2", p, &[Kind::Alloc, Kind::Pool])
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    size: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemAllocAsync", || {
        let mut st = enter("cuMemAllocAsync", true)?;
        let (_, dev) = need_context(&mut st, "cuMemAllocAsync")?;
        if !stream.is_null() {
            lookup_stream(&mut st, "cuMemAllocAsync", stream)?;
        }
        if dptr.is_null() || size == 0 {
            return Err(INVALID_VALUE);
        }
        let p = new_region(&mut st, size as u64, dev, Kind::Pool)?;
        // SAFETY: checked non-null; driver contract: a CUdeviceptr out-pointer.
        unsafe { out(dptr, p) }
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(p: CUdeviceptr, stream: CUstream) -> CUresult {
    guard("cuMemFreeAsync", || {
        let mut st = enter("cuMemFreeAsync", true)?;
        need_context(&mut st, "cuMemFreeAsync")?;
        if stream.is_null() {
            return free_region(&mut st, "cuMemFreeAsync", p, &[Kind::Pool, Kind::Alloc]);
        }
        let s = lookup_stream(&mut st, "cuMemFreeAsync", stream)?;
        if !st.regions.get(&p).is_some_and(|r| r.kind == Kind::Pool) {
            st.find(
                Class::InvalidHandle,
                format!("cuMemFreeAsync({p:#x}): not a live pool allocation"),
            );
            return Err(INVALID_VALUE);
        }
        drop(st);
        s.push(Op::Free { start: p });
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    base: *mut CUdeviceptr,
    size: *mut usize,
    p: CUdeviceptr,
) -> CUresult {
    guard("cuMemGetAddressRange_v2", || {
        let st = enter("cuMemGetAddressRange_v2", true)?;
        let r = st.region_at(p).ok_or(INVALID_VALUE)?;
        let (b, n) = (r.start, r.len as usize);
        // SAFETY: driver contract: out-pointers (either may be null).
        unsafe {
            if !base.is_null() {
                base.write(b);
            }
            if !size.is_null() {
                size.write(n);
            }
        }
        Ok(())
    })
}

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemLocation {
    pub type_: c_uint,
    pub id: c_int,
}

/// `CUmemAllocationProp`.
#[repr(C)]
pub struct MemAllocationProp {
    pub type_: c_uint,
    pub requested_handle_types: c_uint,
    pub location: MemLocation,
    pub win32_handle_meta_data: *mut c_void,
    pub alloc_flags: [u8; 8],
}

/// `CUmemAccessDesc`.
#[repr(C)]
pub struct MemAccessDesc {
    pub location: MemLocation,
    pub flags: c_uint,
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    granularity: *mut usize,
    _prop: *const MemAllocationProp,
    _option: c_uint,
) -> CUresult {
    guard("cuMemGetAllocationGranularity", || {
        let _st = enter("cuMemGetAllocationGranularity", true)?;
        // SAFETY: driver contract: a size_t out-pointer.
        unsafe { out(granularity, GRANULARITY as usize) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    _alignment: usize,
    addr: CUdeviceptr,
    _flags: c_ulonglong,
) -> CUresult {
    guard("cuMemAddressReserve", || {
        let mut st = enter("cuMemAddressReserve", true)?;
        if ptr.is_null() || size == 0 || !(size as u64).is_multiple_of(GRANULARITY) {
            return Err(INVALID_VALUE);
        }
        if addr != 0 {
            st.find(
                Class::Unsupported,
                "cuMemAddressReserve at a fixed address is not emulated".into(),
            );
            return Err(INVALID_VALUE);
        }
        // Aligned to the granularity, as the driver's are (mappings must be).
        let va = HostMap::new(size + GRANULARITY as usize, false).ok_or(OUT_OF_MEMORY)?;
        let start = (va.addr as u64).div_ceil(GRANULARITY) * GRANULARITY;
        st.reservations.insert(start, (size as u64, Arc::new(va)));
        // SAFETY: checked non-null; driver contract: a CUdeviceptr out-pointer.
        unsafe { out(ptr, start) }
    })
}

#[no_mangle]
pub extern "C" fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) -> CUresult {
    guard("cuMemAddressFree", || {
        let mut st = enter("cuMemAddressFree", true)?;
        let ok = st
            .reservations
            .get(&ptr)
            .is_some_and(|(len, _)| *len == size as u64);
        if !ok {
            st.find(
                Class::InvalidHandle,
                format!("cuMemAddressFree({ptr:#x}, {size}): not a live reservation"),
            );
            return Err(INVALID_VALUE);
        }
        if !st.mappings_in(ptr, ptr + size as u64).is_empty() {
            st.find(
                Class::Leak,
                format!("cuMemAddressFree({ptr:#x}): the range still has mappings"),
            );
            return Err(INVALID_VALUE);
        }
        st.reservations.remove(&ptr);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const MemAllocationProp,
    _flags: c_ulonglong,
) -> CUresult {
    guard("cuMemCreate", || {
        let mut st = enter("cuMemCreate", true)?;
        if handle.is_null()
            || prop.is_null()
            || size == 0
            || !(size as u64).is_multiple_of(GRANULARITY)
        {
            return Err(INVALID_VALUE);
        }
        // SAFETY: driver contract: `prop` points to a CUmemAllocationProp.
        let prop = unsafe { &*prop };
        // type PINNED (1), location DEVICE (1).
        if prop.type_ != 1 || prop.location.type_ != 1 {
            return Err(INVALID_VALUE);
        }
        let device = prop.location.id;
        if device < 0 || device >= st.cfg.devices {
            return Err(INVALID_DEVICE);
        }
        let shadow = if st.cfg.backing {
            Some(Arc::new(Shadow(
                HostMap::new(size, true).ok_or(OUT_OF_MEMORY)?,
            )))
        } else {
            None
        };
        let h = st.id();
        st.phys.insert(
            h,
            Phys {
                len: size as u64,
                device,
                shadow,
            },
        );
        // SAFETY: checked non-null; driver contract: a handle out-pointer.
        unsafe { out(handle, h) }
    })
}

#[no_mangle]
pub extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    guard("cuMemRelease", || {
        let mut st = enter("cuMemRelease", true)?;
        if st.phys.remove(&handle).is_none() {
            st.find(
                Class::InvalidHandle,
                format!("cuMemRelease({handle}): not a live allocation handle"),
            );
            return Err(INVALID_VALUE);
        }
        // Mappings keep the memory alive until unmapped, as in the driver.
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    _flags: c_ulonglong,
) -> CUresult {
    guard("cuMemMap", || {
        let mut st = enter("cuMemMap", true)?;
        let size = size as u64;
        let inside = st
            .reservations
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&s, (len, _))| ptr + size <= s + len);
        let Some(ph) = st.phys.get(&handle) else {
            st.find(
                Class::InvalidHandle,
                format!("cuMemMap: {handle} is not a live allocation handle"),
            );
            return Err(INVALID_HANDLE);
        };
        if !inside || size == 0 || offset as u64 + size > ph.len || !ptr.is_multiple_of(GRANULARITY)
        {
            return Err(INVALID_VALUE);
        }
        if st
            .regions
            .range(..ptr + size)
            .next_back()
            .is_some_and(|(_, r)| r.start + r.len > ptr)
        {
            return Err(INVALID_VALUE); // already mapped
        }
        let (device, shadow) = (ph.device, ph.shadow.clone());
        let buffer_id = st.id();
        st.regions.insert(
            ptr,
            Region {
                start: ptr,
                len: size,
                device,
                kind: Kind::Mapped,
                shadow,
                shadow_off: offset as u64,
                buffer_id,
                accessible: false,
                _va: None,
            },
        );
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemSetAccess(
    ptr: CUdeviceptr,
    size: usize,
    desc: *const MemAccessDesc,
    count: usize,
) -> CUresult {
    guard("cuMemSetAccess", || {
        let mut st = enter("cuMemSetAccess", true)?;
        if desc.is_null() || count == 0 {
            return Err(INVALID_VALUE);
        }
        // SAFETY: driver contract: `count` descriptors.
        let descs = unsafe { std::slice::from_raw_parts(desc, count) };
        let end = ptr + size as u64;
        let keys = st.mappings_in(ptr, end);
        if keys.is_empty() {
            return Err(INVALID_VALUE);
        }
        for k in keys {
            let r = st.regions.get_mut(&k).expect("listed");
            // Read-write (3) for the memory's own device.
            r.accessible = descs
                .iter()
                .any(|d| d.location.type_ == 1 && d.location.id == r.device && d.flags == 3);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    guard("cuMemUnmap", || {
        let mut st = enter("cuMemUnmap", true)?;
        let end = ptr + size as u64;
        let keys = st.mappings_in(ptr, end);
        if keys.is_empty() {
            return Err(INVALID_VALUE);
        }
        if let Some((s, e)) = st.inflight_overlap(ptr, end) {
            st.find(
                Class::FreedWhilePending,
                format!("cuMemUnmap({ptr:#x}) while an async copy into {s:#x}..{e:#x} is pending"),
            );
        }
        for k in keys {
            st.regions.remove(&k);
        }
        Ok(())
    })
}

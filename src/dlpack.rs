//! DLPack export of memory owned by Rust (a file mapping), both the versioned (>= 1.0)
//! and the legacy layout, and the reading of tensors other producers hand us (the
//! destinations of copies). Hand-written `repr(C)` structs following dlpack.h 1.x.
//!
//! Ownership: each exported tensor boxes a `Context` that holds an `Arc` of the owner (the
//! mapping), the shape and the strides. The consumer calls `deleter` exactly once when it
//! is done, which drops the box and with it the owner's reference. A tensor never consumed
//! is freed by `free_unconsumed` (the capsule destructor in the Python layer).

use std::ffi::c_void;
use std::sync::Arc;

use crate::dtype::DType;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

pub const DL_CPU: i32 = 1;
pub const DL_CUDA: i32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

#[repr(C)]
pub struct DLManagedTensor {
    pub dl_tensor: DLTensor,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLPackVersion {
    pub major: u32,
    pub minor: u32,
}

#[repr(C)]
pub struct DLManagedTensorVersioned {
    pub version: DLPackVersion,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    pub flags: u64,
    pub dl_tensor: DLTensor,
}

/// The DLPack version we produce.
pub const VERSION: DLPackVersion = DLPackVersion { major: 1, minor: 0 };
pub const FLAG_READ_ONLY: u64 = 1 << 0;

/// Anything that keeps exported memory valid.
pub type Owner = Arc<dyn Send + Sync>;

/// What a tensor export describes: `data + byte_offset` is the first element.
pub struct Export {
    pub owner: Owner,
    pub data: *mut u8,
    pub byte_offset: u64,
    pub dtype: DType,
    pub shape: Vec<i64>,
    /// In elements, as DLPack counts them.
    pub strides: Vec<i64>,
}

/// Lives in `manager_ctx`; owns the shape/stride arrays the DLTensor points into.
struct Context {
    _owner: Owner,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

fn dl_tensor(e: &Export, ctx: &mut Context) -> DLTensor {
    let (code, bits, lanes) = e.dtype.dlpack();
    DLTensor {
        data: e.data.cast(),
        device: DLDevice {
            device_type: DL_CPU,
            device_id: 0,
        },
        ndim: ctx.shape.len() as i32,
        dtype: DLDataType { code, bits, lanes },
        shape: ctx.shape.as_mut_ptr(),
        strides: ctx.strides.as_mut_ptr(),
        byte_offset: e.byte_offset,
    }
}

fn context(e: &Export) -> Box<Context> {
    Box::new(Context {
        _owner: e.owner.clone(),
        shape: e.shape.clone(),
        strides: e.strides.clone(),
    })
}

/// Builds a versioned managed tensor. The caller must hand the pointer to exactly one
/// consumer (which calls its deleter) or free it with `free_versioned`.
pub fn export_versioned(e: &Export) -> *mut DLManagedTensorVersioned {
    let mut ctx = context(e);
    let dl = dl_tensor(e, &mut ctx);
    let managed = Box::new(DLManagedTensorVersioned {
        version: VERSION,
        manager_ctx: Box::into_raw(ctx).cast(),
        deleter: Some(delete_versioned),
        // Writable: the memory is a private copy-on-write mapping, and torch ignores the
        // flag anyway (it would give writable tensors over read-only pages otherwise).
        flags: 0,
        dl_tensor: dl,
    });
    Box::into_raw(managed)
}

/// Builds a legacy (unversioned) managed tensor; same contract as `export_versioned`.
pub fn export_legacy(e: &Export) -> *mut DLManagedTensor {
    let mut ctx = context(e);
    let dl = dl_tensor(e, &mut ctx);
    let managed = Box::new(DLManagedTensor {
        dl_tensor: dl,
        manager_ctx: Box::into_raw(ctx).cast(),
        deleter: Some(delete_legacy),
    });
    Box::into_raw(managed)
}

unsafe extern "C" fn delete_versioned(p: *mut DLManagedTensorVersioned) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` came from `Box::into_raw` in `export_versioned` and DLPack guarantees the
    // deleter runs once; `manager_ctx` came from `Box::into_raw(Context)` there.
    unsafe {
        let managed = Box::from_raw(p);
        drop(Box::from_raw(managed.manager_ctx.cast::<Context>()));
    }
}

unsafe extern "C" fn delete_legacy(p: *mut DLManagedTensor) {
    if p.is_null() {
        return;
    }
    // SAFETY: as in `delete_versioned`, for the box made by `export_legacy`.
    unsafe {
        let managed = Box::from_raw(p);
        drop(Box::from_raw(managed.manager_ctx.cast::<Context>()));
    }
}

/// Frees a versioned tensor nobody consumed.
///
/// # Safety
/// `p` must come from `export_versioned` and not have been passed to a consumer.
pub unsafe fn free_versioned(p: *mut DLManagedTensorVersioned) {
    // SAFETY: forwarded contract.
    unsafe { delete_versioned(p) }
}

/// Frees a legacy tensor nobody consumed.
///
/// # Safety
/// `p` must come from `export_legacy` and not have been passed to a consumer.
pub unsafe fn free_legacy(p: *mut DLManagedTensor) {
    // SAFETY: forwarded contract.
    unsafe { delete_legacy(p) }
}

/// The memory a dense tensor from another producer occupies: what a copy may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// DLPack device type (`DL_CPU`, `DL_CUDA`, ...) and ordinal.
    pub device: (i32, i32),
    /// Address of the first byte (`data + byte_offset`).
    pub addr: u64,
    /// Bytes from `addr` that belong to the tensor.
    pub nbytes: u64,
}

/// The byte range a DLTensor covers, if it is dense: C-contiguous (absent strides, or
/// row-major strides; dimensions of size 1 may have any stride), whole bytes per element
/// and one lane. Anything else is refused with the reason.
///
/// # Safety
/// `t` must point to a valid `DLTensor` whose `shape` (and `strides`, when not null) point
/// to `ndim` readable `i64`s.
pub unsafe fn dense_buffer(t: *const DLTensor) -> Result<Buffer, String> {
    // SAFETY: caller's contract: `t` is a valid DLTensor.
    let t = unsafe { &*t };
    let ndim = usize::try_from(t.ndim).map_err(|_| format!("negative ndim {}", t.ndim))?;
    let shape: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: caller's contract: `shape` holds `ndim` i64s.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let strides: Option<&[i64]> = if t.strides.is_null() || ndim == 0 {
        None
    } else {
        // SAFETY: caller's contract: non-null `strides` holds `ndim` i64s.
        Some(unsafe { std::slice::from_raw_parts(t.strides, ndim) })
    };
    if t.dtype.lanes != 1 || t.dtype.bits == 0 || t.dtype.bits % 8 != 0 {
        return Err(format!(
            "elements of {} bits x {} lanes are not whole bytes",
            t.dtype.bits, t.dtype.lanes
        ));
    }
    let mut numel: u64 = 1;
    for &d in shape {
        let d = u64::try_from(d).map_err(|_| format!("negative dimension in {shape:?}"))?;
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    }
    if let Some(strides) = strides {
        let mut expected: i64 = 1;
        for (&d, &s) in shape.iter().zip(strides).rev() {
            if d != 1 && s != expected && numel != 0 {
                return Err(format!(
                    "not contiguous (shape {shape:?}, strides {strides:?})"
                ));
            }
            expected = expected.saturating_mul(d);
        }
    }
    let nbytes = numel
        .checked_mul(u64::from(t.dtype.bits / 8))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let addr = (t.data as u64)
        .checked_add(t.byte_offset)
        .ok_or_else(|| "data pointer plus byte_offset overflows".to_string())?;
    Ok(Buffer {
        device: (t.device.device_type, t.device.device_id),
        addr,
        nbytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: &mut [i64], strides: Option<&mut [i64]>, bits: u8) -> DLTensor {
        DLTensor {
            data: 0x1000 as *mut c_void,
            device: DLDevice {
                device_type: DL_CUDA,
                device_id: 3,
            },
            ndim: shape.len() as i32,
            dtype: DLDataType {
                code: 2,
                bits,
                lanes: 1,
            },
            shape: shape.as_mut_ptr(),
            strides: strides.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr()),
            byte_offset: 16,
        }
    }

    #[test]
    fn dense_buffers_are_read_and_others_refused() {
        let mut shape = [2, 3];
        let t = tensor(&mut shape, None, 32);
        // SAFETY: a valid DLTensor over live local arrays.
        let b = unsafe { dense_buffer(&t) }.unwrap();
        assert_eq!(
            b,
            Buffer {
                device: (DL_CUDA, 3),
                addr: 0x1010,
                nbytes: 24
            }
        );

        let (mut shape, mut strides) = ([2, 1, 3], [3, 99, 1]);
        let t = tensor(&mut shape, Some(&mut strides), 16);
        // SAFETY: as above.
        assert_eq!(unsafe { dense_buffer(&t) }.unwrap().nbytes, 12);

        let (mut shape, mut strides) = ([2, 3], [1, 2]);
        let t = tensor(&mut shape, Some(&mut strides), 16);
        // SAFETY: as above.
        let e = unsafe { dense_buffer(&t) }.unwrap_err();
        assert!(e.contains("not contiguous"), "{e}");

        let mut shape = [5];
        let t = tensor(&mut shape, None, 4);
        // SAFETY: as above.
        assert!(unsafe { dense_buffer(&t) }.is_err());

        let mut shape = [-1];
        let t = tensor(&mut shape, None, 8);
        // SAFETY: as above.
        assert!(unsafe { dense_buffer(&t) }.is_err());
    }

    #[test]
    fn deleter_releases_the_owner() {
        let owner: Arc<Vec<u8>> = Arc::new(vec![0u8; 16]);
        let e = Export {
            owner: owner.clone(),
            data: owner.as_ptr() as *mut u8,
            byte_offset: 4,
            dtype: DType::F32,
            shape: vec![3],
            strides: vec![1],
        };
        let v = export_versioned(&e);
        let l = export_legacy(&e);
        drop(e);
        assert_eq!(Arc::strong_count(&owner), 3);
        // SAFETY: both pointers come from the exports above and were never consumed.
        unsafe {
            assert_eq!((*v).dl_tensor.ndim, 1);
            assert_eq!(*(*v).dl_tensor.shape, 3);
            assert_eq!((*l).dl_tensor.byte_offset, 4);
            free_versioned(v);
            free_legacy(l);
        }
        assert_eq!(Arc::strong_count(&owner), 1);
    }
}

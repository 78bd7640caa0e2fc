//! DLPack export of memory owned by Rust (a file mapping), both the versioned (>= 1.0)
//! and the legacy layout, and the reading of tensors other producers hand us (the
//! destinations of copies). Hand-written `repr(C)` structs following dlpack.h 1.x.
//!
//! Ownership: each exported tensor is one boxed `Holder`: the managed tensor, an `Arc` of
//! the owner (the mapping), the shape and the strides. The consumer calls `deleter` exactly
//! once when it is done, which drops the box and with it the owner's reference. A tensor never consumed
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

/// Heap memory of our own that exports may hand out (and consumers may write): a copy
/// of file bytes that cannot be exported in place, such as a storage not aligned for its
/// dtype. Aligned to [`OwnedBytes::ALIGN`] bytes, zero-filled when made.
pub struct OwnedBytes {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: `OwnedBytes` owns its allocation outright (like a `Box<[u8]>`); the pointer is
// never shared except through exports, whose consumers follow DLPack's rules.
unsafe impl Send for OwnedBytes {}
// SAFETY: as above; `&OwnedBytes` only reads the pointer and length.
unsafe impl Sync for OwnedBytes {}

impl OwnedBytes {
    /// Alignment of every buffer: enough for any dtype (and a cache line).
    pub const ALIGN: usize = 64;

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
            .expect("a buffer size that fits in isize")
    }

    /// `len` zero bytes, or `None` if the allocation fails.
    pub fn zeroed(len: usize) -> Option<OwnedBytes> {
        if len > isize::MAX as usize - Self::ALIGN {
            return None;
        }
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        std::ptr::NonNull::new(p).map(|ptr| OwnedBytes { ptr, len })
    }

    /// The bytes, for filling before the buffer is shared.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialised (zeroed) bytes that `&mut self` borrows exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The address of the first byte, for exports.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for OwnedBytes {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// What a tensor export describes: `data + byte_offset` is the first element.
pub struct Export<'a> {
    pub owner: &'a Owner,
    pub data: *mut u8,
    pub byte_offset: u64,
    pub dtype: DType,
    pub shape: &'a [i64],
    /// In elements, as DLPack counts them.
    pub strides: &'a [i64],
}

/// Tensors of up to this many dimensions keep shape and strides inside the export's one
/// allocation (loads of 100k small tensors make 100k exports; each costs one `malloc`).
const INLINE_DIMS: usize = 6;

/// Shape then strides.
enum Dims {
    Inline([i64; 2 * INLINE_DIMS]),
    Heap(Box<[i64]>),
}

impl Dims {
    fn new(shape: &[i64], strides: &[i64]) -> Dims {
        let n = shape.len();
        if n <= INLINE_DIMS && strides.len() == n {
            let mut a = [0i64; 2 * INLINE_DIMS];
            a[..n].copy_from_slice(shape);
            a[n..2 * n].copy_from_slice(strides);
            Dims::Inline(a)
        } else {
            Dims::Heap(shape.iter().chain(strides).copied().collect())
        }
    }

    /// Pointers to the shape and the strides of a `Dims` that will not move again.
    ///
    /// # Safety
    /// `dims` must point to a live `Dims` nothing else accesses, made from a shape of
    /// `ndim` dimensions.
    unsafe fn pointers(dims: *mut Dims, ndim: usize) -> (*mut i64, *mut i64) {
        // SAFETY: the caller's contract; both halves lie inside the array.
        unsafe {
            let base = match &mut *dims {
                Dims::Inline(a) => a.as_mut_ptr(),
                Dims::Heap(b) => b.as_mut_ptr(),
            };
            (base, base.add(ndim))
        }
    }
}

/// One allocation per export: the managed tensor DLPack hands around (first, so a pointer
/// to it is a pointer to the holder), the owner keeping the memory alive, and the
/// shape/strides arrays the DLTensor points into.
#[repr(C)]
struct Holder<M> {
    managed: M,
    _owner: Owner,
    dims: Dims,
}

fn dl_tensor(e: &Export<'_>) -> DLTensor {
    // Exports are only made of dtypes DLPack can carry (callers check `dlpack()`); a
    // byte-sized fallback keeps this function total.
    let (code, bits, lanes) =
        e.dtype
            .dlpack()
            .unwrap_or((crate::dtype::dl_code::UINT, (e.dtype.size() * 8) as u8, 1));
    DLTensor {
        data: e.data.cast(),
        device: DLDevice {
            device_type: DL_CPU,
            device_id: 0,
        },
        ndim: e.shape.len() as i32,
        dtype: DLDataType { code, bits, lanes },
        // Set once the holder is boxed (see `finish`).
        shape: std::ptr::null_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: e.byte_offset,
    }
}

/// Boxes `managed` with the export's owner and dims, points its DLTensor at the boxed
/// dims and its `manager_ctx` at the holder, and leaks it to the caller.
fn finish<M>(
    e: &Export<'_>,
    managed: M,
    fields: impl FnOnce(*mut M) -> (*mut DLTensor, *mut *mut c_void),
) -> *mut M {
    let holder = Box::into_raw(Box::new(Holder {
        managed,
        _owner: e.owner.clone(),
        dims: Dims::new(e.shape, e.strides),
    }));
    // SAFETY: `holder` is the unique pointer to a live box just leaked; the field pointers
    // are derived from it, and the dims live in the same allocation, which stays put until
    // the deleter frees it.
    unsafe {
        let (shape, strides) =
            Dims::pointers(std::ptr::addr_of_mut!((*holder).dims), e.shape.len());
        let managed = std::ptr::addr_of_mut!((*holder).managed);
        let (tensor, ctx) = fields(managed);
        (*tensor).shape = shape;
        (*tensor).strides = strides;
        *ctx = holder.cast();
        managed
    }
}

/// Builds a versioned managed tensor. The caller must hand the pointer to exactly one
/// consumer (which calls its deleter) or free it with `free_versioned`.
pub fn export_versioned(e: &Export<'_>) -> *mut DLManagedTensorVersioned {
    let managed = DLManagedTensorVersioned {
        version: VERSION,
        manager_ctx: std::ptr::null_mut(),
        deleter: Some(delete_versioned),
        // Writable: the memory is a private copy-on-write mapping, and torch ignores the
        // flag anyway (it would give writable tensors over read-only pages otherwise).
        flags: 0,
        dl_tensor: dl_tensor(e),
    };
    finish(e, managed, |m| {
        // SAFETY: `m` points to the boxed managed tensor (see `finish`).
        unsafe {
            (
                std::ptr::addr_of_mut!((*m).dl_tensor),
                std::ptr::addr_of_mut!((*m).manager_ctx),
            )
        }
    })
}

/// Builds a legacy (unversioned) managed tensor; same contract as `export_versioned`.
pub fn export_legacy(e: &Export<'_>) -> *mut DLManagedTensor {
    let managed = DLManagedTensor {
        dl_tensor: dl_tensor(e),
        manager_ctx: std::ptr::null_mut(),
        deleter: Some(delete_legacy),
    };
    finish(e, managed, |m| {
        // SAFETY: `m` points to the boxed managed tensor (see `finish`).
        unsafe {
            (
                std::ptr::addr_of_mut!((*m).dl_tensor),
                std::ptr::addr_of_mut!((*m).manager_ctx),
            )
        }
    })
}

unsafe extern "C" fn delete_versioned(p: *mut DLManagedTensorVersioned) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` is the first field of a `Holder` leaked by `export_versioned`
    // (`repr(C)`, so the addresses coincide), and DLPack guarantees the deleter runs once.
    unsafe { drop(Box::from_raw(p.cast::<Holder<DLManagedTensorVersioned>>())) }
}

unsafe extern "C" fn delete_legacy(p: *mut DLManagedTensor) {
    if p.is_null() {
        return;
    }
    // SAFETY: as in `delete_versioned`, for the holder made by `export_legacy`.
    unsafe { drop(Box::from_raw(p.cast::<Holder<DLManagedTensor>>())) }
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
        let dyn_owner: Owner = owner.clone();
        let e = Export {
            owner: &dyn_owner,
            data: owner.as_ptr() as *mut u8,
            byte_offset: 4,
            dtype: DType::F32,
            shape: &[3],
            strides: &[1],
        };
        let v = export_versioned(&e);
        let l = export_legacy(&e);
        drop(dyn_owner);
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

    #[test]
    fn shapes_and_strides_of_any_rank_survive_the_export() {
        let owner: Owner = Arc::new(vec![0u8; 64]);
        for ndim in [0usize, 1, 6, 7, 12] {
            let shape: Vec<i64> = (1..=ndim as i64).collect();
            let strides: Vec<i64> = (0..ndim as i64).map(|d| 100 + d).collect();
            let e = Export {
                owner: &owner,
                data: std::ptr::null_mut(),
                byte_offset: 0,
                dtype: DType::BF16,
                shape: &shape,
                strides: &strides,
            };
            let v = export_versioned(&e);
            let l = export_legacy(&e);
            // SAFETY: fresh exports, never consumed; their arrays hold `ndim` values each.
            unsafe {
                for t in [&(*v).dl_tensor, &(*l).dl_tensor] {
                    assert_eq!(t.ndim as usize, ndim);
                    assert_eq!(std::slice::from_raw_parts(t.shape, ndim), &shape[..]);
                    assert_eq!(std::slice::from_raw_parts(t.strides, ndim), &strides[..]);
                }
                assert_eq!((*v).manager_ctx, v.cast());
                free_versioned(v);
                free_legacy(l);
            }
        }
        assert_eq!(Arc::strong_count(&owner), 1);
    }
}

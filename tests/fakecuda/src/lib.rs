//! fakecuda: a fake CUDA driver (`libcuda.so`) that zeroload's real copy engine loads in CI,
//! where no machine has a GPU. It behaves like the driver where the engine can tell, and is
//! stricter than it everywhere else: it records every rule the real driver would break
//! silently or punish later ("findings"), and tests assert there are none.
//!
//! - **Asynchrony.** Each stream is a FIFO run by its own worker thread, which waits a random
//!   (seeded) delay before each operation and reads a copy's source *when it runs*. Events
//!   complete when the worker reaches them; `cuEventQuery` says `NOT_READY` until then.
//! - **Device memory is not host memory.** Device addresses are reserved with
//!   `mmap(PROT_NONE)`: a host read or write through one crashes, as on a GPU. The bytes
//!   live in a separate shadow buffer that copies write and `cuMemcpyDtoH_v2` reads.
//! - **Allocators.** `cuMemAlloc_v2` (the caching allocator's segments), VMM ranges
//!   (`cuMemAddressReserve`/`cuMemCreate`/`cuMemMap`/`cuMemSetAccess`: PyTorch's
//!   `expandable_segments`) and stream-ordered pool allocations (`cuMemAllocAsync`:
//!   `cudaMallocAsync`) each report pointer attributes as a real driver does.
//! - **Fault injection.** Fail the Nth call of any entry point with a chosen `CUresult`,
//!   fail the Nth copy *on the stream* (reported by the next query or synchronisation),
//!   turn the library into a stub (every call returns `CUDA_ERROR_STUB_LIBRARY`), or
//!   report no device.
//! - **Simulated link.** A per-stream bandwidth (`link_gbps`) paces copies, so benchmarks
//!   can ask whether the engine keeps a link of known speed busy.
//!
//! Finding classes (`fakecuda_findings`): see [`Class`] in `state.rs`. Control functions
//! are the `fakecuda_*` exports of `control.rs`; `tests/fakecuda/fakecuda.py` wraps them.
//!
//! Files: `state.rs` (the lock, configuration, findings, the common start of every entry
//! point), `memory.rs` (pinned, device, pool and VMM memory), `streams.rs` (worker
//! threads, events, copies), `device.rs` (init, devices, contexts, pointer attributes,
//! error names), `control.rs` (`fakecuda_*`); this file holds the driver's types and codes.
//! Configuration: `fakecuda_config(key, value)` or `FAKECUDA_<KEY>` environment variables
//! read when the library is first used (keys listed at `Config::set`).

#![allow(non_snake_case)] // driver entry points keep their C names
#![allow(clippy::missing_safety_doc)] // every export's contract is the CUDA driver's

mod control;
mod device;
mod memory;
mod state;
mod streams;

use std::ffi::{c_int, c_uint, c_ulonglong, c_void, CStr};

use memory::*;
use state::*;
use streams::*;

pub type CUresult = c_uint;
pub type CUdevice = c_int;
pub type CUdeviceptr = c_ulonglong;
pub type CUcontext = *mut c_void;
pub type CUstream = *mut c_void;
pub type CUevent = *mut c_void;
pub type CUmemoryPool = *mut c_void;
pub type CUmemGenericAllocationHandle = c_ulonglong;

const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const NOT_INITIALIZED: CUresult = 3;
const NO_DEVICE: CUresult = 100;
const INVALID_DEVICE: CUresult = 101;
const INVALID_CONTEXT: CUresult = 201;
const INVALID_HANDLE: CUresult = 400;
const NOT_READY: CUresult = 600;
const UNKNOWN: CUresult = 999;

/// Names and descriptions of the codes the fake returns or tests inject.
const ERRORS: &[(CUresult, &CStr, &CStr)] = &[
    (0, c"CUDA_SUCCESS", c"no error"),
    (1, c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
    (2, c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
    (3, c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
    (4, c"CUDA_ERROR_DEINITIALIZED", c"driver shutting down"),
    (
        34,
        c"CUDA_ERROR_STUB_LIBRARY",
        c"CUDA driver is a stub library",
    ),
    (
        100,
        c"CUDA_ERROR_NO_DEVICE",
        c"no CUDA-capable device is detected",
    ),
    (101, c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
    (
        201,
        c"CUDA_ERROR_INVALID_CONTEXT",
        c"invalid device context",
    ),
    (
        400,
        c"CUDA_ERROR_INVALID_HANDLE",
        c"invalid resource handle",
    ),
    (600, c"CUDA_ERROR_NOT_READY", c"device not ready"),
    (
        700,
        c"CUDA_ERROR_ILLEGAL_ADDRESS",
        c"an illegal memory access was encountered",
    ),
    (
        719,
        c"CUDA_ERROR_LAUNCH_FAILED",
        c"unspecified launch failure",
    ),
    (801, c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
    (999, c"CUDA_ERROR_UNKNOWN", c"unknown error"),
];

// Handles are tagged, non-canonical addresses: a client that dereferences one crashes.
const TAG_MASK: usize = 0xff00_0000_0000_0000;
const TAG_CTX: usize = 0xdc00_0000_0000_0000;
const TAG_STREAM: usize = 0xd500_0000_0000_0000;
const TAG_EVENT: usize = 0xde00_0000_0000_0000;
const TAG_POOL: usize = 0xd900_0000_0000_0000;

/// Physical allocation granularity of VMM allocations (as on current GPUs).
const GRANULARITY: u64 = 2 << 20;
const PAGE: usize = 4096;

//! The segment-copy kernel ([`CopyKernel`]): PTX (`copy_segments.ptx`, generated from
//! `copy_segments.cu` by `scripts/build-ptx.sh`), JIT-compiled by the driver, that moves
//! many small segments in one launch.

use crate::context::Gpu;
use crate::error::CudaError;
use crate::stream::Stream;
use crate::sys::{CUfunction, CUmodule};
use std::os::raw::{c_uint, c_void};
use std::sync::Arc;

/// The kernel's PTX, NUL-terminated for `cuModuleLoadData`.
static PTX: &str = concat!(include_str!("copy_segments.ptx"), "\0");

/// Threads per block of the copy kernel (its `__launch_bounds__`).
const COPY_THREADS: c_uint = 256;
/// Segments one block takes at a time (8 warps × 4).
const SEGMENTS_PER_BLOCK: c_uint = 32;
/// Most blocks per launch (the kernel strides over further segments).
const COPY_MAX_BLOCKS: c_uint = 8192;

impl Gpu {
    /// Loads the segment-copy kernel (`copy_segments.ptx`, JIT-compiled by the driver for
    /// this GPU) into this GPU's primary context, which it makes current on the calling
    /// thread.
    pub fn copy_kernel(self: &Arc<Self>) -> Result<CopyKernel, CudaError> {
        self.copy_kernel_from(PTX, COPY_THREADS, SEGMENTS_PER_BLOCK)
    }

    /// Loads a `kvt_copy_segments` kernel from other PTX (to measure variants of it):
    /// `threads` per block, each block taking `segments_per_block` segments at a time.
    pub fn copy_kernel_from(
        self: &Arc<Self>,
        ptx: &str,
        threads: u32,
        segments_per_block: u32,
    ) -> Result<CopyKernel, CudaError> {
        self.bind()?;
        let image = std::ffi::CString::new(ptx.trim_end_matches('\0'))
            .map_err(|_| CudaError::other("cuModuleLoadData", "PTX with a NUL byte inside"))?;
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: a NUL-terminated PTX image; valid out-pointer; a context is current.
        self.cuda.check("cuModuleLoadData", unsafe {
            (self.cuda.api.module_load_data)(&mut module, image.as_ptr().cast())
        })?;
        let mut function: CUfunction = std::ptr::null_mut();
        // SAFETY: a loaded module and a NUL-terminated name.
        let rc = unsafe {
            (self.cuda.api.module_get_function)(
                &mut function,
                module,
                c"kvt_copy_segments".as_ptr(),
            )
        };
        let mut runs_function: CUfunction = std::ptr::null_mut();
        // SAFETY: a loaded module (or null when loading failed: then rc above is an error
        // and the lookup's own result is ignored) and a NUL-terminated name.
        let runs_rc = unsafe {
            (self.cuda.api.module_get_function)(
                &mut runs_function,
                module,
                c"kvt_copy_runs".as_ptr(),
            )
        };
        // Made before the check so that the module is unloaded on failure too.
        let kernel = CopyKernel {
            gpu: Arc::clone(self),
            module,
            function,
            runs_function: (runs_rc == 0 && !runs_function.is_null()).then_some(runs_function),
            threads: threads.max(1),
            segments_per_block: segments_per_block.max(1),
        };
        self.cuda.check("cuModuleGetFunction", rc)?;
        Ok(kernel)
    }
}

/// The segment-copy kernel loaded in a GPU's context; unloaded on drop.
pub struct CopyKernel {
    gpu: Arc<Gpu>,
    module: CUmodule,
    function: CUfunction,
    /// `kvt_copy_runs`, when the PTX has it.
    runs_function: Option<CUfunction>,
    threads: c_uint,
    segments_per_block: c_uint,
}

// SAFETY: module and function handles may be used from any thread with the context current.
unsafe impl Send for CopyKernel {}

impl CopyKernel {
    /// Queues one launch that copies `n` segments: `sizes[i]` bytes from `srcs[i]` to
    /// `dsts[i]`, where `dsts`, `srcs` and `sizes` are arrays of `n` u64 in memory the
    /// GPU can read (mapped pinned memory).
    ///
    /// # Safety
    /// The three arrays must hold `n` entries and stay unmodified, and every segment's
    /// source and destination (device memory or mapped pinned host memory) stay valid,
    /// until the stream (or a later event) has been synchronized; segments must not
    /// overlap. The stream must belong to this kernel's context, which must be current.
    pub unsafe fn launch(
        &self,
        stream: &Stream,
        dsts: u64,
        srcs: u64,
        sizes: u64,
        n: u32,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let (mut dsts, mut srcs, mut sizes, mut n) = (dsts, srcs, sizes, n);
        let mut params: [*mut c_void; 4] = [
            (&mut dsts as *mut u64).cast(),
            (&mut srcs as *mut u64).cast(),
            (&mut sizes as *mut u64).cast(),
            (&mut n as *mut u32).cast(),
        ];
        // SAFETY: `params` points at four live values matching the kernel's parameters
        // (u64, u64, u64, u32), read during the call; the memory contract is the caller's.
        self.gpu.cuda.check("cuLaunchKernel", unsafe {
            (self.gpu.cuda.api.launch_kernel)(
                self.function,
                n.div_ceil(self.segments_per_block).min(COPY_MAX_BLOCKS),
                1,
                1,
                self.threads,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

/// Where each kind of a layer is for [`CopyKernel::launch_runs`] (the kernel's `Kinds`):
/// this side's region, the peer's, and the kind's block size; up to 4 kinds (K, V,
/// K-scale, V-scale).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunKinds {
    pub local: [u64; 4],
    pub remote: [u64; 4],
    pub block_bytes: [u64; 4],
}

impl CopyKernel {
    /// Whether this kernel has the runs entry ([`CopyKernel::launch_runs`]).
    pub fn has_runs(&self) -> bool {
        self.runs_function.is_some()
    }

    /// Queues one launch that copies `nruns` runs for each of `kinds` kinds: run `r`
    /// (three u32 at `runs + 12r`: local block, remote block, blocks) of kind `k` copies
    /// `blocks × block_bytes[k]` bytes from `local[k] + local block × block_bytes[k]` to
    /// `remote[k] + remote block × block_bytes[k]`.
    ///
    /// # Safety
    /// As for [`CopyKernel::launch`]: the runs table (in memory the GPU can read) and every
    /// range it names stay valid and unmodified until the stream has been synchronized;
    /// copies must not overlap; `kinds` ≤ 4; the stream is of this kernel's context, which
    /// is current. Panics if the kernel has no runs entry.
    pub unsafe fn launch_runs(
        &self,
        stream: &Stream,
        runs: u64,
        nruns: u32,
        kinds: u32,
        places: &RunKinds,
    ) -> Result<(), CudaError> {
        let function = self.runs_function.expect("launch_runs needs kvt_copy_runs");
        let segments = nruns.saturating_mul(kinds);
        if segments == 0 {
            return Ok(());
        }
        let (mut runs, mut nruns, mut kinds, mut places) = (runs, nruns, kinds, *places);
        let mut params: [*mut c_void; 4] = [
            (&mut runs as *mut u64).cast(),
            (&mut nruns as *mut u32).cast(),
            (&mut kinds as *mut u32).cast(),
            (&mut places as *mut RunKinds).cast(),
        ];
        // SAFETY: `params` points at four live values matching the kernel's parameters
        // (u64, u32, u32, the 96-byte Kinds struct), read during the call; the memory
        // contract is the caller's.
        self.gpu.cuda.check("cuLaunchKernel", unsafe {
            (self.gpu.cuda.api.launch_kernel)(
                function,
                segments
                    .div_ceil(self.segments_per_block)
                    .min(COPY_MAX_BLOCKS),
                1,
                1,
                self.threads,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for CopyKernel {
    fn drop(&mut self) {
        let _current = self.gpu.scoped();
        // SAFETY: loaded by cuModuleLoadData, unloaded once (launches were synchronized by
        // the owner's stream drop first).
        unsafe { (self.gpu.cuda.api.module_unload)(self.module) };
    }
}

#[cfg(test)]
mod tests {
    use super::PTX;

    #[test]
    fn ptx_is_one_nul_terminated_image_with_the_entry() {
        assert!(PTX.ends_with('\0'));
        assert_eq!(PTX.matches('\0').count(), 1);
        assert!(PTX.contains(".visible .entry kvt_copy_segments("));
        assert!(PTX.contains(".visible .entry kvt_copy_runs("));
    }
}

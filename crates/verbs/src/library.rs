//! Run-time loading of `libibverbs.so.1`.
//!
//! The crate never links against libibverbs: every exported verb is looked up
//! with `dlopen`/`dlsym` (through `libloading`) when [`Library::load`] runs, so
//! binaries start (and can report a clear error) on hosts without rdma-core.
//! Only the *inline* verbs of `verbs.h` (`ibv_post_send`, `ibv_poll_cq`, ...)
//! are used from `rdma-sys`; they call through the provider's function table.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::sync::Arc;

use rdma_sys::{
    ibv_comp_channel, ibv_context, ibv_cq, ibv_device, ibv_device_attr, ibv_mr, ibv_pd,
    ibv_port_attr, ibv_qp, ibv_qp_attr, ibv_qp_init_attr, ibv_srq, ibv_srq_init_attr,
};

use crate::error::{Result, VerbsError};

/// The soname [`Library::load`] opens.
pub const LIBIBVERBS_SONAME: &str = "libibverbs.so.1";

/// Function pointers of the exported libibverbs verbs (prototypes as in `verbs.h`).
pub(crate) struct Fns {
    pub get_device_list: unsafe extern "C" fn(*mut c_int) -> *mut *mut ibv_device,
    pub free_device_list: unsafe extern "C" fn(*mut *mut ibv_device),
    pub get_device_name: unsafe extern "C" fn(*mut ibv_device) -> *const c_char,
    pub get_device_guid: unsafe extern "C" fn(*mut ibv_device) -> u64,
    pub open_device: unsafe extern "C" fn(*mut ibv_device) -> *mut ibv_context,
    pub close_device: unsafe extern "C" fn(*mut ibv_context) -> c_int,
    pub query_device: unsafe extern "C" fn(*mut ibv_context, *mut ibv_device_attr) -> c_int,
    /// The exported `ibv_query_port` fills the (prefix) compat layout of
    /// `ibv_port_attr`; callers zero the whole struct first.
    pub query_port: unsafe extern "C" fn(*mut ibv_context, u8, *mut ibv_port_attr) -> c_int,
    pub query_gid: unsafe extern "C" fn(*mut ibv_context, u8, c_int, *mut [u8; 16]) -> c_int,
    pub alloc_pd: unsafe extern "C" fn(*mut ibv_context) -> *mut ibv_pd,
    pub dealloc_pd: unsafe extern "C" fn(*mut ibv_pd) -> c_int,
    pub reg_mr: unsafe extern "C" fn(*mut ibv_pd, *mut c_void, usize, c_int) -> *mut ibv_mr,
    /// `ibv_reg_mr_iova2` (rdma-core >= 29); optional access flags need it.
    pub reg_mr_iova2:
        Option<unsafe extern "C" fn(*mut ibv_pd, *mut c_void, usize, u64, c_uint) -> *mut ibv_mr>,
    /// `ibv_reg_dmabuf_mr` (rdma-core >= 34).
    pub reg_dmabuf_mr:
        Option<unsafe extern "C" fn(*mut ibv_pd, u64, usize, u64, c_int, c_int) -> *mut ibv_mr>,
    pub dereg_mr: unsafe extern "C" fn(*mut ibv_mr) -> c_int,
    pub create_comp_channel: unsafe extern "C" fn(*mut ibv_context) -> *mut ibv_comp_channel,
    pub destroy_comp_channel: unsafe extern "C" fn(*mut ibv_comp_channel) -> c_int,
    pub create_cq: unsafe extern "C" fn(
        *mut ibv_context,
        c_int,
        *mut c_void,
        *mut ibv_comp_channel,
        c_int,
    ) -> *mut ibv_cq,
    pub destroy_cq: unsafe extern "C" fn(*mut ibv_cq) -> c_int,
    pub get_cq_event:
        unsafe extern "C" fn(*mut ibv_comp_channel, *mut *mut ibv_cq, *mut *mut c_void) -> c_int,
    pub ack_cq_events: unsafe extern "C" fn(*mut ibv_cq, c_uint),
    pub create_qp: unsafe extern "C" fn(*mut ibv_pd, *mut ibv_qp_init_attr) -> *mut ibv_qp,
    pub modify_qp: unsafe extern "C" fn(*mut ibv_qp, *mut ibv_qp_attr, c_int) -> c_int,
    pub destroy_qp: unsafe extern "C" fn(*mut ibv_qp) -> c_int,
    pub create_srq: unsafe extern "C" fn(*mut ibv_pd, *mut ibv_srq_init_attr) -> *mut ibv_srq,
    pub destroy_srq: unsafe extern "C" fn(*mut ibv_srq) -> c_int,
    pub wc_status_str: unsafe extern "C" fn(c_uint) -> *const c_char,
}

/// A loaded `libibverbs.so.1` and the verbs resolved from it.
///
/// Shared by `Arc`; every verbs object keeps it alive through its
/// [`Context`](crate::Context).
pub struct Library {
    soname: String,
    pub(crate) f: Fns,
    // Dropped last (fields drop in declaration order), after nothing can call `f`.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("soname", &self.soname)
            .field("reg_mr_iova2", &self.f.reg_mr_iova2.is_some())
            .field("reg_dmabuf_mr", &self.f.reg_dmabuf_mr.is_some())
            .finish()
    }
}

impl Library {
    /// Loads [`LIBIBVERBS_SONAME`] and resolves the verbs.
    ///
    /// Fails with [`VerbsError::LibraryMissing`] (naming the library and the
    /// `dlerror` text) when rdma-core is not installed.
    pub fn load() -> Result<Arc<Library>> {
        Self::load_soname(LIBIBVERBS_SONAME)
    }

    /// Like [`Library::load`] with an explicit soname or path (tests, unusual installs).
    pub fn load_soname(soname: &str) -> Result<Arc<Library>> {
        // SAFETY: loading libibverbs runs its ELF constructors, which only
        // initialise internal state (no global side effects on the process
        // beyond registering providers). A library of another name is the
        // caller's choice; its constructors are trusted like any linked library.
        let lib = unsafe { libloading::Library::new(soname) }.map_err(|e| {
            VerbsError::LibraryMissing {
                library: soname.to_owned(),
                reason: e.to_string(),
            }
        })?;
        let f = {
            macro_rules! req {
                ($name:literal) => {{
                    // SAFETY: the field type this expression initialises is the
                    // C prototype of `$name` from rdma-core's `verbs.h`; the
                    // pointer is only used while `_lib` stays loaded (it is a
                    // field of the same `Library`).
                    match unsafe { lib.get(concat!($name, "\0").as_bytes()) } {
                        Ok(s) => *s,
                        Err(e) => {
                            return Err(VerbsError::SymbolMissing {
                                library: soname.to_owned(),
                                symbol: $name,
                                reason: e.to_string(),
                            })
                        }
                    }
                }};
            }
            macro_rules! opt {
                ($name:literal) => {{
                    // SAFETY: as for `req!`: the prototype matches `verbs.h` and
                    // the library outlives the pointer.
                    unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                        .ok()
                        .map(|s| *s)
                }};
            }
            Fns {
                get_device_list: req!("ibv_get_device_list"),
                free_device_list: req!("ibv_free_device_list"),
                get_device_name: req!("ibv_get_device_name"),
                get_device_guid: req!("ibv_get_device_guid"),
                open_device: req!("ibv_open_device"),
                close_device: req!("ibv_close_device"),
                query_device: req!("ibv_query_device"),
                query_port: req!("ibv_query_port"),
                query_gid: req!("ibv_query_gid"),
                alloc_pd: req!("ibv_alloc_pd"),
                dealloc_pd: req!("ibv_dealloc_pd"),
                reg_mr: req!("ibv_reg_mr"),
                reg_mr_iova2: opt!("ibv_reg_mr_iova2"),
                reg_dmabuf_mr: opt!("ibv_reg_dmabuf_mr"),
                dereg_mr: req!("ibv_dereg_mr"),
                create_comp_channel: req!("ibv_create_comp_channel"),
                destroy_comp_channel: req!("ibv_destroy_comp_channel"),
                create_cq: req!("ibv_create_cq"),
                destroy_cq: req!("ibv_destroy_cq"),
                get_cq_event: req!("ibv_get_cq_event"),
                ack_cq_events: req!("ibv_ack_cq_events"),
                create_qp: req!("ibv_create_qp"),
                modify_qp: req!("ibv_modify_qp"),
                destroy_qp: req!("ibv_destroy_qp"),
                create_srq: req!("ibv_create_srq"),
                destroy_srq: req!("ibv_destroy_srq"),
                wc_status_str: req!("ibv_wc_status_str"),
            }
        };
        Ok(Arc::new(Library {
            soname: soname.to_owned(),
            f,
            _lib: lib,
        }))
    }

    /// The soname (or path) this library was loaded from.
    pub fn soname(&self) -> &str {
        &self.soname
    }

    /// Whether `ibv_reg_mr_iova2` exists: optional access flags (relaxed ordering) can be
    /// passed to the device; without it they are dropped.
    pub fn has_optional_access(&self) -> bool {
        self.f.reg_mr_iova2.is_some()
    }

    /// Whether `ibv_reg_dmabuf_mr` exists (needed for GPU memory registration).
    pub fn has_dmabuf(&self) -> bool {
        self.f.reg_dmabuf_mr.is_some()
    }

    /// libibverbs' text for a work-completion status (`ibv_wc_status_str`).
    pub fn wc_status_str(&self, status: u32) -> String {
        // SAFETY: ibv_wc_status_str accepts any value and returns a pointer to
        // a static NUL-terminated string ("unknown" for unknown values).
        let p = unsafe { (self.f.wc_status_str)(status) };
        if p.is_null() {
            return format!("status {status}");
        }
        // SAFETY: non-null static NUL-terminated string (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

//! Devices, device contexts and protection domains.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::raw::c_int;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{ibv_context, ibv_device, ibv_device_attr, ibv_pd, ibv_port_attr, ibv_port_state};

use crate::error::{errno_err, rc_err, Result, VerbsError};
use crate::library::Library;

/// `IBV_LINK_LAYER_INFINIBAND` from `verbs.h`.
const LINK_LAYER_INFINIBAND: u8 = 1;
/// `IBV_LINK_LAYER_UNSPECIFIED` (old kernels; means InfiniBand).
const LINK_LAYER_UNSPECIFIED: u8 = 0;

/// One entry of [`list_devices`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Kernel device name, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
    /// Node GUID in host byte order (0 when unknown).
    pub guid: u64,
}

/// The RDMA devices present on this host (empty when there are none, including
/// when the kernel has no RDMA support).
pub fn list_devices(lib: &Library) -> Result<Vec<DeviceInfo>> {
    let list = DeviceList::get(lib)?;
    Ok(list
        .devices()
        .iter()
        .map(|&dev| DeviceInfo {
            name: device_name(lib, dev),
            // SAFETY: `dev` comes from a live device list.
            guid: u64::from_be(unsafe { (lib.f.get_device_guid)(dev) }),
        })
        .collect())
}

/// Owner of an `ibv_get_device_list` array; frees it on drop.
struct DeviceList<'a> {
    lib: &'a Library,
    /// `None` when the kernel has no RDMA support (`ENOSYS`): no devices.
    list: Option<NonNull<*mut ibv_device>>,
    len: usize,
}

impl<'a> DeviceList<'a> {
    fn get(lib: &'a Library) -> Result<Self> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the returned array is freed in Drop.
        let p = unsafe { (lib.f.get_device_list)(&mut n) };
        let list = match NonNull::new(p) {
            Some(l) => Some(l),
            // No uverbs support in the kernel (e.g. no RDMA modules): no devices.
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) => None,
            None => return Err(errno_err("ibv_get_device_list")),
        };
        Ok(DeviceList {
            lib,
            list,
            len: usize::try_from(n).unwrap_or(0),
        })
    }

    fn devices(&self) -> &[*mut ibv_device] {
        let Some(list) = self.list else {
            return &[];
        };
        // SAFETY: libibverbs returns an array of `len` device pointers (plus a
        // NULL terminator) that stays valid until ibv_free_device_list.
        unsafe { std::slice::from_raw_parts(list.as_ptr(), self.len) }
    }
}

impl Drop for DeviceList<'_> {
    fn drop(&mut self) {
        if let Some(list) = self.list {
            // SAFETY: the array came from ibv_get_device_list and is freed once.
            unsafe { (self.lib.f.free_device_list)(list.as_ptr()) }
        }
    }
}

fn device_name(lib: &Library, dev: *mut ibv_device) -> String {
    // SAFETY: `dev` is an element of a live device list.
    let p = unsafe { (lib.f.get_device_name)(dev) };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ibv_get_device_name returns the NUL-terminated name stored in
    // the device struct, valid while the list is alive.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Limits of a device (`ibv_query_device`) that callers size resources by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAttrs {
    /// Maximum work requests per queue.
    pub max_qp_wr: u32,
    /// Maximum scatter/gather entries per send/recv work request.
    pub max_sge: u32,
    /// Maximum entries of a completion queue.
    pub max_cqe: u32,
    /// Maximum outstanding RDMA READs a QP can target (responder side).
    pub max_qp_rd_atom: u32,
    /// Maximum outstanding RDMA READs a QP can initiate.
    pub max_qp_init_rd_atom: u32,
    /// Maximum work requests of a shared receive queue.
    pub max_srq_wr: u32,
    /// Largest registrable memory region in bytes.
    pub max_mr_size: u64,
    /// Number of physical ports (ports are numbered from 1).
    pub phys_port_cnt: u8,
    /// IEEE vendor id (`ibv_device_attr::vendor_id`).
    pub vendor_id: u32,
}

/// Vendor id the Soft-RoCE driver reports (`RXE_VENDOR_ID` in the kernel).
const RXE_VENDOR_ID: u32 = 0x00ff_ffff;
/// Vendor id the soft-iWARP driver reports (`SIW_VENDOR_ID`: "bmt").
const SIW_VENDOR_ID: u32 = 0x0062_6d74;

impl DeviceAttrs {
    /// Whether the device is a software provider (Soft-RoCE or soft-iWARP): there
    /// `ibv_post_send` runs the transport protocol on the calling thread instead of
    /// ringing a NIC's doorbell.
    pub fn is_software_provider(&self) -> bool {
        self.vendor_id == RXE_VENDOR_ID || self.vendor_id == SIW_VENDOR_ID
    }
}

/// Port state and addressing (`ibv_query_port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInfo {
    /// The port is `IBV_PORT_ACTIVE`.
    pub state_active: bool,
    /// Raw `ibv_port_state` value.
    pub state: u32,
    /// Local identifier (InfiniBand only; 0 on RoCE).
    pub lid: u16,
    /// Active MTU as an `ibv_mtu` code (1 = 256 ... 5 = 4096 bytes).
    pub active_mtu: u32,
    /// InfiniBand link layer (address by LID) rather than Ethernet (RoCE, address by GID).
    pub link_layer_is_infiniband: bool,
    /// Number of entries in the GID table.
    pub gid_table_len: u32,
}

/// Bytes of an `ibv_mtu` code (0 for unknown codes).
pub fn mtu_bytes(code: u32) -> u32 {
    match code {
        1..=5 => 128 << code,
        _ => 0,
    }
}

/// The RoCE/IB type of a GID table entry (from sysfs `gid_attrs/types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    /// `IB/RoCE v1`: InfiniBand GID or RoCE v1 (Ethernet, not routable).
    IbRoceV1,
    /// `RoCE v2`: UDP/IP encapsulated, routable.
    RoceV2,
}

/// An open device (`ibv_context`). Parent of every other verbs object.
pub struct Context {
    lib: Arc<Library>,
    ctx: NonNull<ibv_context>,
    name: String,
    attrs: DeviceAttrs,
}

// SAFETY: libibverbs contexts are thread-safe: every verb on a context and
// on the objects created from it may be called from any thread concurrently
// (rdma-core documents its API as thread safe; providers lock internally).
unsafe impl Send for Context {}
// SAFETY: see the `Send` impl; `&Context` only exposes thread-safe verbs.
unsafe impl Sync for Context {}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.name)
            .field("attrs", &self.attrs)
            .finish()
    }
}

impl Context {
    /// Opens the device called `name` (see [`list_devices`]).
    pub fn open(lib: &Arc<Library>, name: &str) -> Result<Arc<Context>> {
        let list = DeviceList::get(lib)?;
        let mut available = Vec::new();
        let mut found = None;
        for &dev in list.devices() {
            let n = device_name(lib, dev);
            if n == name {
                found = Some(dev);
                break;
            }
            available.push(n);
        }
        let Some(dev) = found else {
            return Err(VerbsError::NoDevice {
                wanted: name.to_owned(),
                available,
            });
        };
        // SAFETY: `dev` belongs to the live list; the context stays valid after
        // the list is freed (documented by ibv_get_device_list(3)).
        let p = unsafe { (lib.f.open_device)(dev) };
        drop(list);
        let ctx = NonNull::new(p).ok_or_else(|| errno_err("ibv_open_device"))?;
        let mut this = Context {
            lib: Arc::clone(lib),
            ctx,
            name: name.to_owned(),
            attrs: DeviceAttrs {
                max_qp_wr: 0,
                max_sge: 0,
                max_cqe: 0,
                max_qp_rd_atom: 0,
                max_qp_init_rd_atom: 0,
                max_srq_wr: 0,
                max_mr_size: 0,
                phys_port_cnt: 0,
                vendor_id: 0,
            },
        };
        let mut a = MaybeUninit::<ibv_device_attr>::zeroed();
        // SAFETY: live context; `a` is a writable ibv_device_attr.
        let rc = unsafe { (lib.f.query_device)(ctx.as_ptr(), a.as_mut_ptr()) };
        if rc != 0 {
            return Err(rc_err("ibv_query_device", rc));
        }
        // SAFETY: zero-initialised plain-data struct, filled by ibv_query_device.
        let a = unsafe { a.assume_init() };
        let u = |v: c_int| u32::try_from(v).unwrap_or(0);
        this.attrs = DeviceAttrs {
            max_qp_wr: u(a.max_qp_wr),
            max_sge: u(a.max_sge),
            max_cqe: u(a.max_cqe),
            max_qp_rd_atom: u(a.max_qp_rd_atom),
            max_qp_init_rd_atom: u(a.max_qp_init_rd_atom),
            max_srq_wr: u(a.max_srq_wr),
            max_mr_size: a.max_mr_size,
            phys_port_cnt: a.phys_port_cnt,
            vendor_id: a.vendor_id,
        };
        Ok(Arc::new(this))
    }

    /// The device name this context was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Device limits queried at open time.
    pub fn attrs(&self) -> &DeviceAttrs {
        &self.attrs
    }

    /// The library this context was opened through.
    pub fn library(&self) -> &Arc<Library> {
        &self.lib
    }

    pub(crate) fn lib(&self) -> &Library {
        &self.lib
    }

    pub(crate) fn as_ptr(&self) -> *mut ibv_context {
        self.ctx.as_ptr()
    }

    /// State and addressing of `port` (1-based).
    pub fn query_port(&self, port: u8) -> Result<PortInfo> {
        let mut a = MaybeUninit::<ibv_port_attr>::zeroed();
        // SAFETY: live context; the exported ibv_query_port writes at most
        // sizeof(ibv_port_attr) bytes into the zeroed struct.
        let rc = unsafe { (self.lib.f.query_port)(self.as_ptr(), port, a.as_mut_ptr()) };
        if rc != 0 {
            return Err(rc_err("ibv_query_port", rc));
        }
        // SAFETY: plain-data struct, zero-initialised and filled above.
        let a = unsafe { a.assume_init() };
        Ok(PortInfo {
            state_active: a.state == ibv_port_state::IBV_PORT_ACTIVE,
            state: a.state,
            lid: a.lid,
            active_mtu: a.active_mtu,
            link_layer_is_infiniband: matches!(
                a.link_layer,
                LINK_LAYER_INFINIBAND | LINK_LAYER_UNSPECIFIED
            ),
            gid_table_len: u32::try_from(a.gid_tbl_len).unwrap_or(0),
        })
    }

    /// The raw 16-byte GID at `index` of `port`'s GID table.
    pub fn query_gid(&self, port: u8, index: u8) -> Result<[u8; 16]> {
        let idx = c_int::from(index);
        let mut gid = [0u8; 16];
        // SAFETY: live context; `gid` is a writable 16-byte union ibv_gid.
        let rc = unsafe { (self.lib.f.query_gid)(self.as_ptr(), port, idx, &mut gid) };
        if rc != 0 {
            let e = rc_err("ibv_query_gid", rc);
            return Err(self.gid_err(port, index, &e.to_string()));
        }
        Ok(gid)
    }

    fn gid_err(&self, port: u8, index: u8, reason: &str) -> VerbsError {
        VerbsError::Gid {
            device: self.name.clone(),
            port,
            index,
            reason: reason.to_owned(),
        }
    }

    /// Type of GID `index` of `port`, read from
    /// `/sys/class/infiniband/<dev>/ports/<port>/gid_attrs/types/<index>`;
    /// `None` when the entry is empty or the file cannot be read.
    pub fn gid_type(&self, port: u8, index: u8) -> Option<GidType> {
        let path = format!(
            "/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}",
            self.name
        );
        let s = std::fs::read_to_string(path).ok()?;
        match s.trim() {
            "RoCE v2" => Some(GidType::RoceV2),
            "IB/RoCE v1" => Some(GidType::IbRoceV1),
            _ => None,
        }
    }

    /// Index of the first GID of `port` that is an IPv4-mapped address
    /// (`::ffff:a.b.c.d`) of type RoCE v2 — the GID to use on RoCE networks.
    /// `Ok(None)` when there is none (e.g. InfiniBand, or no IPv4 address).
    pub fn find_roce_v2_ipv4_gid(&self, port: u8) -> Result<Option<u8>> {
        let info = self.query_port(port)?;
        for index in 0..=u8::try_from(info.gid_table_len.saturating_sub(1)).unwrap_or(u8::MAX) {
            if info.gid_table_len == 0 {
                break;
            }
            let Ok(gid) = self.query_gid(port, index) else {
                continue;
            };
            if gid_ipv4(&gid).is_some() && self.gid_type(port, index) == Some(GidType::RoceV2) {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }
}

/// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`), else `None`.
pub fn gid_ipv4(gid: &[u8; 16]) -> Option<std::net::Ipv4Addr> {
    if gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xff && gid[11] == 0xff {
        Some(std::net::Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
    } else {
        None
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc<Context>, so none is alive;
        // the context is closed exactly once.
        unsafe { (self.lib.f.close_device)(self.ctx.as_ptr()) };
    }
}

/// A protection domain (`ibv_pd`): groups MRs and QPs that may work together.
pub struct ProtectionDomain {
    ctx: Arc<Context>,
    pd: NonNull<ibv_pd>,
}

// SAFETY: PD verbs are thread-safe (see `Context`); the pointer is owned.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above; `&ProtectionDomain` only allows creating children.
unsafe impl Sync for ProtectionDomain {}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.ctx.name)
            .finish()
    }
}

impl ProtectionDomain {
    /// Allocates a protection domain on `ctx`.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<ProtectionDomain>> {
        // SAFETY: live context.
        let p = unsafe { (ctx.lib.f.alloc_pd)(ctx.as_ptr()) };
        let pd = NonNull::new(p).ok_or_else(|| errno_err("ibv_alloc_pd"))?;
        Ok(Arc::new(ProtectionDomain {
            ctx: Arc::clone(ctx),
            pd,
        }))
    }

    /// The device context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub(crate) fn as_ptr(&self) -> *mut ibv_pd {
        self.pd.as_ptr()
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: MRs, QPs and SRQs hold an Arc to their PD, so none is alive.
        unsafe { (self.ctx.lib.f.dealloc_pd)(self.pd.as_ptr()) };
    }
}

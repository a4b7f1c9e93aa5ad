//! Safe, small ibverbs layer for kvtransfer.
//!
//! This is the only crate that touches `rdma-sys`. It never links against
//! libibverbs: exported verbs are resolved at run time from `libibverbs.so.1`
//! ([`Library::load`]); only the inline verbs (`ibv_post_send`, `ibv_poll_cq`,
//! ...) come from `rdma-sys`, and they call through the provider's function
//! table. Binaries therefore have no `NEEDED` entry for libibverbs/librdmacm
//! and start on hosts without rdma-core.
//!
//! Ownership: every object holds an `Arc` of its parents
//! (Context ← PD ← MR/SRQ, Context ← channel ← CQ, PD/CQ/SRQ ← QP), so
//! destruction always runs children first.

mod batch;
mod cq;
mod device;
mod error;
mod library;
mod mr;
mod qp;

pub use batch::{LocalBuf, RemoteBuf, SendBatch};
pub use cq::{
    wc_status_text, CompletionChannel, CompletionQueue, CqId, WorkCompletion, WC_OPCODE_RDMA_READ,
    WC_OPCODE_RDMA_WRITE, WC_OPCODE_RECV, WC_OPCODE_RECV_RDMA_WITH_IMM, WC_STATUS_REM_ACCESS_ERR,
    WC_STATUS_WR_FLUSH_ERR,
};
pub use device::{
    gid_ipv4, list_devices, mtu_bytes, Context, DeviceAttrs, DeviceInfo, GidType, PortInfo,
    ProtectionDomain,
};
pub use error::{PostError, Result, VerbsError};
pub use library::{Library, LIBIBVERBS_SONAME};
pub use mr::{Access, MemoryRegion};
pub use qp::{Dest, QpCaps, QueuePair, RtrParams, RtsParams, SharedReceiveQueue};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_error_names_library_and_reason() {
        let err = Library::load_soname("libkvtransfer-does-not-exist.so.9").unwrap_err();
        let VerbsError::LibraryMissing { library, reason } = &err else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!(library, "libkvtransfer-does-not-exist.so.9");
        assert!(
            reason.contains("libkvtransfer-does-not-exist.so.9"),
            "{reason}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot load libkvtransfer-does-not-exist.so.9: "),
            "{msg}"
        );
        assert!(msg.contains("libibverbs1"), "{msg}");
    }

    #[test]
    fn access_flags() {
        let a = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::RELAXED_ORDERING;
        assert!(a.has_optional());
        assert_eq!(
            a.without_optional(),
            Access::LOCAL_WRITE | Access::REMOTE_WRITE
        );
        assert!(a.contains(Access::REMOTE_WRITE));
        assert!(!a.contains(Access::REMOTE_READ));
    }

    #[test]
    fn send_batch_links_without_allocating_and_reports_full() {
        let mut b = SendBatch::with_capacity(3);
        assert!(b.link().is_none());
        let l = LocalBuf {
            addr: 0x1000,
            len: 8,
            lkey: 1,
        };
        let r = RemoteBuf {
            addr: 0x2000,
            rkey: 2,
        };
        b.push_write(1, l, r, false).unwrap();
        b.push_write_with_imm(2, LocalBuf { len: 0, ..l }, r, 7, false)
            .unwrap();
        b.push_read(3, l, r, true).unwrap();
        assert!(matches!(
            b.push_write(4, l, r, true),
            Err(VerbsError::BatchFull { capacity: 3 })
        ));
        let head = b.link().unwrap();
        // SAFETY: `head` points to the batch's first WR, linked just above.
        let (w0, w1, w2) = unsafe { (&*head, &*(*head).next, &*(*(*head).next).next) };
        assert_eq!((w0.wr_id, w1.wr_id, w2.wr_id), (1, 2, 3));
        assert!(w2.next.is_null());
        assert_eq!((w0.num_sge, w1.num_sge), (1, 0));
        assert_eq!(b.wr_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn gid_helpers() {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[10, 77, 0, 1]);
        assert_eq!(gid_ipv4(&g), Some(std::net::Ipv4Addr::new(10, 77, 0, 1)));
        g[0] = 0xfe;
        assert_eq!(gid_ipv4(&g), None);
        assert_eq!(mtu_bytes(3), 1024);
        assert_eq!(mtu_bytes(5), 4096);
        assert_eq!(wc_status_text(10), "remote access error");
    }
}

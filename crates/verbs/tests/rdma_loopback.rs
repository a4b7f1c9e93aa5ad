//! Real RDMA tests of the verbs layer over one device (Soft-RoCE in CI).
//!
//! The device tests are `#[ignore]`d (reported as ignored on hosts without a
//! device); `--ignored` runs them and they FAIL on any problem,
//! `KVTRANSFER_RDMA_DEVICE` unset included. `library_loads_and_lists_device`
//! always runs (without libibverbs it checks the `LibraryMissing` error). Run
//! them with
//! `bash scripts/rxe-vm/run-rdma-tests.sh`, which sets
//! `KVTRANSFER_RDMA_DEVICE`, `KVTRANSFER_GID_INDEX` and `KVTRANSFER_RDMA_IP`
//! inside a Soft-RoCE VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtransfer_verbs::{
    list_devices, Access, CompletionChannel, CompletionQueue, Context, Dest, Library, LocalBuf,
    MemoryRegion, ProtectionDomain, QpCaps, QueuePair, RemoteBuf, RtrParams, RtsParams, SendBatch,
    SharedReceiveQueue, VerbsError, WorkCompletion, WC_OPCODE_RDMA_READ, WC_OPCODE_RDMA_WRITE,
    WC_OPCODE_RECV_RDMA_WITH_IMM, WC_STATUS_REM_ACCESS_ERR,
};

const PORT: u8 = 1;
const WAIT: Duration = Duration::from_secs(120);

struct Env {
    lib: Arc<Library>,
    ctx: Arc<Context>,
    gid: [u8; 16],
    gid_index: u8,
    mtu: u32,
}

fn env(test: &str) -> Env {
    let dev = std::env::var("KVTRANSFER_RDMA_DEVICE").unwrap_or_else(|_| {
        panic!(
            "{test} needs an RDMA device but KVTRANSFER_RDMA_DEVICE is unset \
             (run scripts/rxe-vm/run-rdma-tests.sh)"
        )
    });
    let lib = Library::load().expect("load libibverbs");
    let ctx = Context::open(&lib, &dev).expect("open device");
    let port = ctx.query_port(PORT).expect("query port");
    assert!(
        port.state_active,
        "port {PORT} of {dev} is not active: {port:?}"
    );
    let gid_index = ctx
        .find_roce_v2_ipv4_gid(PORT)
        .expect("scan GIDs")
        .expect("no RoCE v2 IPv4 GID");
    if let Ok(want) = std::env::var("KVTRANSFER_GID_INDEX") {
        assert_eq!(
            gid_index.to_string(),
            want,
            "find_roce_v2_ipv4_gid disagrees with KVTRANSFER_GID_INDEX"
        );
    }
    let gid = ctx.query_gid(PORT, gid_index).expect("query gid");
    if let Ok(ip) = std::env::var("KVTRANSFER_RDMA_IP") {
        assert_eq!(
            kvtransfer_verbs::gid_ipv4(&gid).map(|a| a.to_string()),
            Some(ip),
            "GID {gid_index} is not the device's IPv4 address"
        );
    }
    Env {
        lib,
        ctx,
        gid,
        gid_index,
        mtu: port.active_mtu,
    }
}

/// Two RC QPs of one process connected to each other, sharing one CQ.
struct Pair {
    ch: Arc<CompletionChannel>,
    cq: Arc<CompletionQueue>,
    srq: Arc<SharedReceiveQueue>,
    a: QueuePair,
    b: QueuePair,
}

fn pair(e: &Env, pd: &Arc<ProtectionDomain>, max_send_wr: u32) -> Pair {
    let ch = CompletionChannel::new(&e.ctx).expect("channel");
    let cq = CompletionQueue::new(&e.ctx, 4096, Some(&ch)).expect("cq");
    let srq = SharedReceiveQueue::new(pd, 64).expect("srq");
    let caps = QpCaps {
        max_send_wr,
        max_recv_wr: 16,
        max_send_sge: 1,
        max_inline: 0,
    };
    let a = QueuePair::new_rc(pd, &cq, &cq, None, caps).expect("qp a");
    let b = QueuePair::new_rc(pd, &cq, &cq, Some(&srq), caps).expect("qp b");
    let rd = e.ctx.attrs().max_qp_rd_atom.clamp(1, 16) as u8;
    let access = Access::REMOTE_WRITE | Access::REMOTE_READ | Access::LOCAL_WRITE;
    for (me, peer, psn, peer_psn) in [(&a, &b, 0x1234, 0x5678), (&b, &a, 0x5678, 0x1234)] {
        me.to_init(PORT, access).expect("INIT");
        me.to_rtr(&RtrParams {
            remote_qpn: peer.qp_num(),
            remote_psn: peer_psn,
            path_mtu: e.mtu,
            dest: Dest::Gid {
                gid: e.gid,
                sgid_index: e.gid_index,
            },
            port: PORT,
            min_rnr_timer: 12,
            max_dest_rd_atomic: rd,
        })
        .expect("RTR");
        me.to_rts(&RtsParams {
            psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: rd,
        })
        .expect("RTS");
    }
    Pair { ch, cq, srq, a, b }
}

/// Waits for `want` completions with the arm / poll / re-poll pattern.
fn wait(p: &Pair, want: usize) -> Vec<WorkCompletion> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    let mut buf = [WorkCompletion::default(); 16];
    loop {
        let n = p.cq.poll(&mut buf).expect("poll");
        got.extend_from_slice(&buf[..n]);
        if got.len() >= want {
            return got;
        }
        if n > 0 {
            continue;
        }
        p.cq.request_notify().expect("arm");
        let n = p.cq.poll(&mut buf).expect("re-poll");
        got.extend_from_slice(&buf[..n]);
        if got.len() >= want {
            return got;
        }
        if n > 0 {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out: {} of {want} completions: {got:?}",
            got.len()
        );
        let mut pfd = libc::pollfd {
            fd: p.ch.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        while let Some(id) = p.ch.get_event().expect("get_event") {
            assert_eq!(id, p.cq.id());
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251 + 1) as u8).collect()
}

fn local(mr: &MemoryRegion, off: usize, len: usize) -> LocalBuf {
    LocalBuf {
        addr: mr.addr() + off as u64,
        len: len as u32,
        lkey: mr.lkey(),
    }
}

fn remote(mr: &MemoryRegion, off: usize) -> RemoteBuf {
    RemoteBuf {
        addr: mr.addr() + off as u64,
        rkey: mr.rkey(),
    }
}

const N: usize = 256;
const CHUNK: usize = 1024;
const STRIDE: usize = 2 * CHUNK; // dst leaves a 1 KiB gap after every chunk

fn write_chain(all_signaled: bool) {
    let name = if all_signaled {
        "write_chain_all_signaled"
    } else {
        "write_chain_last_signaled"
    };
    let e = env(name);
    let mut src = pattern(N * CHUNK);
    let mut dst = vec![0u8; N * STRIDE];
    let mut back = vec![0u8; N * CHUNK];
    let pd = ProtectionDomain::new(&e.ctx).expect("pd");
    let rw = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
    // SAFETY: the vectors outlive the MRs (declared earlier, dropped later)
    // and are only read after the completions covering them were polled.
    let (src_mr, dst_mr, back_mr) = unsafe {
        (
            MemoryRegion::register(&pd, src.as_mut_ptr(), src.len(), Access::LOCAL_WRITE)
                .expect("reg src"),
            MemoryRegion::register(
                &pd,
                dst.as_mut_ptr(),
                dst.len(),
                rw | Access::RELAXED_ORDERING,
            )
            .expect("reg dst"),
            MemoryRegion::register(&pd, back.as_mut_ptr(), back.len(), Access::LOCAL_WRITE)
                .expect("reg back"),
        )
    };
    let p = pair(&e, &pd, 1024);
    p.srq.post_recv(777).expect("post srq recv");

    let mut batch = SendBatch::with_capacity(N + 1);
    for i in 0..N {
        let signaled = all_signaled || i == N - 1;
        batch
            .push_write(
                i as u64,
                local(&src_mr, i * CHUNK, CHUNK),
                remote(&dst_mr, i * STRIDE),
                signaled,
            )
            .expect("push");
    }
    batch
        .push_write_with_imm(
            1000,
            local(&src_mr, 0, 0),
            remote(&dst_mr, 0),
            0xC0FFEE,
            true,
        )
        .expect("push imm");
    assert!(batch.is_full());
    // SAFETY: all ranges lie inside live MRs (src/dst) that outlive the
    // completions waited for below; N + 1 <= max_send_wr.
    unsafe { p.a.post_send(&mut batch) }.expect("post_send");
    let want = if all_signaled { N + 2 } else { 3 };
    let wcs = wait(&p, want);
    assert_eq!(wcs.len(), want, "{wcs:?}");
    for wc in &wcs {
        assert!(
            wc.is_success(),
            "failed completion {wc:?}: {}",
            wc.status_text()
        );
    }
    let sends: Vec<_> = wcs.iter().filter(|w| w.qp_num == p.a.qp_num()).collect();
    let recvs: Vec<_> = wcs.iter().filter(|w| w.qp_num == p.b.qp_num()).collect();
    let mut expect_ids: Vec<u64> = if all_signaled {
        (0..N as u64).collect()
    } else {
        vec![N as u64 - 1]
    };
    expect_ids.push(1000);
    assert_eq!(
        sends.iter().map(|w| w.wr_id).collect::<Vec<_>>(),
        expect_ids
    );
    assert!(sends.iter().all(|w| w.opcode == WC_OPCODE_RDMA_WRITE));
    assert_eq!(recvs.len(), 1);
    assert_eq!(recvs[0].wr_id, 777);
    assert_eq!(recvs[0].opcode, WC_OPCODE_RECV_RDMA_WITH_IMM);
    assert_eq!(recvs[0].imm_data, Some(0xC0FFEE));
    assert_eq!(recvs[0].byte_len, 0);

    for i in 0..N {
        let d = &dst[i * STRIDE..i * STRIDE + CHUNK];
        let s = &src[i * CHUNK..(i + 1) * CHUNK];
        assert!(d == s, "chunk {i} differs");
        let gap = &dst[i * STRIDE + CHUNK..(i + 1) * STRIDE];
        assert!(
            gap.iter().all(|&b| b == 0),
            "gap after chunk {i} was written"
        );
    }

    // One RDMA READ gathering chunk 5 of dst back (A reads B's memory).
    batch.clear();
    batch
        .push_read(
            2000,
            local(&back_mr, 0, CHUNK),
            remote(&dst_mr, 5 * STRIDE),
            true,
        )
        .expect("push read");
    // SAFETY: `back` is only read after the completion; ranges inside MRs.
    unsafe { p.a.post_send(&mut batch) }.expect("post read");
    let wcs = wait(&p, 1);
    assert_eq!(wcs.len(), 1);
    assert!(wcs[0].is_success(), "{:?} {}", wcs[0], wcs[0].status_text());
    assert_eq!(wcs[0].wr_id, 2000);
    assert_eq!(wcs[0].opcode, WC_OPCODE_RDMA_READ);
    assert_eq!(wcs[0].byte_len as usize, CHUNK);
    assert_eq!(&back[..CHUNK], &src[5 * CHUNK..6 * CHUNK]);
    assert!(back[CHUNK..].iter().all(|&b| b == 0));
    drop(p);
    drop((src_mr, dst_mr, back_mr));
    let _ = &e.lib;
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn write_chain_last_signaled() {
    write_chain(false);
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn write_chain_all_signaled() {
    write_chain(true);
}

#[test]
#[ignore = "needs an RDMA device: run in the Soft-RoCE VM (scripts/rxe-vm/run-rdma-tests.sh)"]
fn write_outside_registration_reports_rem_access_err() {
    let e = env("write_outside_registration_reports_rem_access_err");
    let mut src = pattern(4096);
    let mut dst = vec![0u8; 4096];
    let pd = ProtectionDomain::new(&e.ctx).expect("pd");
    // SAFETY: buffers outlive the MRs; read only after completions.
    let (src_mr, dst_mr) = unsafe {
        (
            MemoryRegion::register(&pd, src.as_mut_ptr(), src.len(), Access::LOCAL_WRITE)
                .expect("reg src"),
            MemoryRegion::register(
                &pd,
                dst.as_mut_ptr(),
                dst.len(),
                Access::LOCAL_WRITE | Access::REMOTE_WRITE,
            )
            .expect("reg dst"),
        )
    };
    let p = pair(&e, &pd, 16);
    let mut batch = SendBatch::with_capacity(1);
    // 1 KiB starting 512 bytes before the end of the peer's registration.
    batch
        .push_write(
            42,
            local(&src_mr, 0, 1024),
            remote(&dst_mr, 4096 - 512),
            true,
        )
        .expect("push");
    // SAFETY: the local range is inside `src_mr`; the remote violation is the
    // point of the test and is reported as a completion error.
    unsafe { p.a.post_send(&mut batch) }.expect("post_send");
    let wcs = wait(&p, 1);
    assert_eq!(wcs[0].wr_id, 42);
    assert_eq!(wcs[0].status, WC_STATUS_REM_ACCESS_ERR, "{:?}", wcs[0]);
    assert_eq!(wcs[0].status_text(), "remote access error");
    assert_eq!(e.lib.wc_status_str(wcs[0].status), wcs[0].status_text());
    assert!(dst.iter().all(|&b| b == 0), "destination was written");
    drop(p);
    drop((src_mr, dst_mr));
}

#[test]
fn library_loads_and_lists_device() {
    match Library::load() {
        Ok(lib) => {
            let devs = list_devices(&lib).expect("list devices");
            for s in 0..24 {
                assert_eq!(
                    lib.wc_status_str(s),
                    kvtransfer_verbs::wc_status_text(s),
                    "status {s}"
                );
            }
            if let Ok(dev) = std::env::var("KVTRANSFER_RDMA_DEVICE") {
                assert!(devs.iter().any(|d| d.name == dev), "{dev} not in {devs:?}");
                let err = Context::open(&lib, "no-such-device0").unwrap_err();
                assert!(matches!(err, VerbsError::NoDevice { .. }), "{err}");
                assert!(err.to_string().contains(&dev), "{err}");
            }
        }
        Err(err) => {
            assert!(
                std::env::var("KVTRANSFER_RDMA_DEVICE").is_err(),
                "KVTRANSFER_RDMA_DEVICE is set but {err}"
            );
            assert!(matches!(err, VerbsError::LibraryMissing { .. }), "{err}");
            eprintln!(
                "library_loads_and_lists_device: no libibverbs, checked LibraryMissing: {err}"
            );
        }
    }
}

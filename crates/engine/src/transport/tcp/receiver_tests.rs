//! The receiving side's parser (`receiver.rs`) over a real loopback connection: a writer's
//! reset stops every copy of its bytes, and whole calls land and are acknowledged.

use super::frame::{self, Header};
use super::receiver::{Conn, CLOCK_BUDGET, COPY_WEIGHT};
use super::sockopt;
use super::state::{Admission, ServerState};
use crate::layout::RegionTable;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SESSION: u64 = 77;

/// Host regions of `len` bytes (K and V of one layer, one block) and a server state
/// that admits one data connection with [`SESSION`].
struct Fixture {
    keys: Vec<u8>,
    state: ServerState,
    _values: Vec<u8>,
}

fn fixture(len: usize) -> Fixture {
    let keys = vec![0u8; len];
    let values = vec![0u8; len];
    let table = RegionTable::new(
        &[keys.as_ptr() as u64],
        &[values.as_ptr() as u64],
        1,
        len as u64,
    )
    .unwrap();
    let mut admissions = HashMap::new();
    admissions.insert(
        SESSION,
        Admission {
            peer_name: "w".into(),
        },
    );
    let state = ServerState {
        table: Arc::new(table),
        admissions: Mutex::new(admissions),
        connections: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        arrivals: None,
        metrics: Arc::new(crate::metrics::Metrics::default()),
        prefault: Mutex::new(None),
        isolations: Mutex::new(Vec::new()),
        loop_ended: AtomicBool::new(false),
        crc: std::sync::OnceLock::new(),
    };
    Fixture {
        keys,
        state,
        _values: values,
    }
}

impl Fixture {
    fn landed(&self) -> usize {
        // The receiver wrote through the region's address on this thread, before.
        self.keys.iter().filter(|&&b| b != 0).count()
    }
}

/// A connected pair on loopback: (writer after its hello, the receiver's connection).
fn pair() -> (TcpStream, Conn) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, remote) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    writer.write_all(&frame::encode_hello(SESSION)).unwrap();
    (writer, Conn::new(server, remote))
}

fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}

/// A WRITE header for `len` payload bytes at the start of region 0.
fn header(len: usize) -> [u8; frame::HEADER_BYTES] {
    Header::write(0, 0, len as u32).encode()
}

/// The writer sends a frame's header and `sent` of its `len` payload bytes (arriving
/// before or after the receiver parsed the header, per `payload_after_header`), then
/// resets the connection, as a timed-out call does; the receiver must write none of
/// the payload afterwards.
fn reset_mid_frame(len: usize, sent: usize, payload_after_header: bool) {
    let f = fixture(len);
    let mut buffer = vec![0u8; super::RECEIVE_BUFFER_BYTES];
    let (mut writer, mut conn) = pair();
    writer.write_all(&header(len)).unwrap();
    if payload_after_header {
        settle();
        assert!(!conn.readable(&f.state, &mut buffer).unwrap());
        assert_eq!(f.landed(), 0);
    }
    writer.write_all(&vec![0xAB; sent]).unwrap();
    settle();
    sockopt::reset(&writer).unwrap();
    settle();
    let result = conn.readable(&f.state, &mut buffer);
    assert!(result.is_err(), "the reset was not noticed");
    let landed = f.landed();
    assert_eq!(
        landed, 0,
        "{landed} payload bytes landed after the writer reset the connection"
    );
}

#[test]
fn a_buffered_small_payload_does_not_land_after_a_reset() {
    reset_mid_frame(8 * 1024, 8 * 1024, false);
}

#[test]
fn a_queued_small_payload_does_not_land_after_a_reset() {
    reset_mid_frame(8 * 1024, 8 * 1024, true);
}

#[test]
fn a_partly_sent_large_payload_does_not_land_after_a_reset() {
    reset_mid_frame(64 * 1024, 32 * 1024, false);
}

#[test]
fn a_queued_large_payload_does_not_land_after_a_reset() {
    reset_mid_frame(64 * 1024, 64 * 1024, true);
}

/// Frames queued at the receiver when the reset arrives are checked before their first
/// copy: at most one clock budget's worth (~16 frames) may land, here none does.
#[test]
fn a_reset_while_frames_are_queued_stops_them_within_the_budget() {
    const FRAMES: usize = 200;
    let f = fixture(1024);
    let mut buffer = vec![0u8; super::RECEIVE_BUFFER_BYTES];
    let (mut writer, mut conn) = pair();
    for _ in 0..FRAMES {
        writer.write_all(&header(1024)).unwrap();
        writer.write_all(&[0xAB; 1024]).unwrap();
    }
    settle();
    sockopt::reset(&writer).unwrap();
    settle();
    assert!(conn.readable(&f.state, &mut buffer).is_err());
    let landed_frames = f.landed().div_ceil(1024);
    let bound = CLOCK_BUDGET / (1024 + COPY_WEIGHT) + 1;
    assert!(
        landed_frames <= bound,
        "{landed_frames} queued payloads landed after the reset (at most {bound} may)"
    );
}

#[test]
fn without_a_reset_payloads_land_whole_and_a_commit_is_acknowledged() {
    for len in [8 * 1024, 64 * 1024] {
        let f = fixture(len);
        let mut buffer = vec![0u8; super::RECEIVE_BUFFER_BYTES];
        let (mut writer, mut conn) = pair();
        writer.write_all(&header(len)).unwrap();
        writer.write_all(&vec![0xAB; len]).unwrap();
        let commit = Header {
            kind: frame::COMMIT,
            flags: 0,
            region: 1,
            offset: 9,
            len: 0,
            aux: 0,
        };
        writer.write_all(&commit.encode()).unwrap();
        settle();
        assert!(!conn.readable(&f.state, &mut buffer).unwrap());
        assert_eq!(f.landed(), len);
        let mut ack = [0u8; frame::HEADER_BYTES];
        writer.read_exact(&mut ack).unwrap();
        let ack = Header::decode(&ack).unwrap();
        assert_eq!((ack.kind, ack.offset), (frame::ACK, 9));
    }
}

/// A tagged call's `COMMIT` carries its encoded notice: the parser records where each
/// `WRITE` landed (through the shared buffer and in place) and sums those bytes before it
/// reports the arrival; a notice that does not decode is refused with a NACK.
#[test]
fn a_notice_checksum_is_verified_against_the_landed_frames() {
    use crate::shard::Cover;
    use crate::transport::{Arrival, ChecksumCheck};
    use crate::wire::Notice;
    let len = 32 * 1024;
    let mut f = fixture(len);
    let seen: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let sink = Arc::clone(&seen);
    f.state.arrivals = Some(Arc::new(move |a| sink.lock().unwrap().push(a)));
    let mut buffer = vec![0u8; super::RECEIVE_BUFFER_BYTES];
    let (mut writer, mut conn) = pair();
    // K: a large frame (lands in place); V: two small ones (through the buffer).
    let k: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
    let v: Vec<u8> = (0..2048).map(|i| (i * 13 + 5) as u8).collect();
    let sum = {
        let mut crc = crate::transport::checksum::Crc32c::new();
        crc.update(&k);
        crc.update(&v);
        crc.sum()
    };
    let call = |writer: &mut TcpStream, id: u64, notice: &[u8]| {
        writer.write_all(&header(len)).unwrap();
        writer.write_all(&k).unwrap();
        writer
            .write_all(&Header::write(1, 0, 1024).encode())
            .unwrap();
        writer.write_all(&v[..1024]).unwrap();
        writer
            .write_all(&Header::write(1, 1024, 1024).encode())
            .unwrap();
        writer.write_all(&v[1024..]).unwrap();
        let commit = Header {
            kind: frame::COMMIT,
            flags: 1,
            region: 1,
            offset: id,
            len: notice.len() as u32,
            aux: 0,
        };
        writer.write_all(&commit.encode()).unwrap();
        writer.write_all(notice).unwrap();
    };
    let notice = |checksum| Notice {
        layer: 0,
        blocks: 1,
        cover: Cover::WHOLE,
        checksum: Some(checksum),
        tag: b"req",
    };
    call(&mut writer, 1, &notice(sum).encode());
    call(&mut writer, 2, &notice(sum ^ 1).encode());
    settle();
    assert!(!conn.readable(&f.state, &mut buffer).unwrap());
    let checks: Vec<_> = seen.lock().unwrap().iter().map(|a| a.checksum).collect();
    assert_eq!(
        checks,
        [
            ChecksumCheck::Verified,
            ChecksumCheck::Mismatch {
                expected: sum ^ 1,
                actual: sum
            }
        ]
    );
    for id in [1, 2] {
        let mut ack = [0u8; frame::HEADER_BYTES];
        writer.read_exact(&mut ack).unwrap();
        let ack = Header::decode(&ack).unwrap();
        assert_eq!((ack.kind, ack.offset), (frame::ACK, id));
    }
    call(&mut writer, 3, b"not a notice");
    settle();
    assert!(conn.readable(&f.state, &mut buffer).is_err());
    let mut nack = [0u8; frame::HEADER_BYTES];
    writer.read_exact(&mut nack).unwrap();
    assert_eq!(Header::decode(&nack).unwrap().kind, frame::NACK);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

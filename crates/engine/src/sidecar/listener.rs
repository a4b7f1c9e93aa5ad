//! The sidecar's listening socket: its path and mode, admission by peer credentials, and
//! one reader and one writer thread per admitted worker.

use super::connection::Connection;
use super::route::WorkerRoute;
use super::SidecarEvent;
use crate::engine::{Engine, PeerHandle, PreparedBlocks};
use crate::error::{Error, Result};
use crate::log::debug;
use crate::util::lock;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the sidecar listens.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// The socket's path.
    pub path: PathBuf,
    /// The socket file's permission bits (e.g. 0o600).
    pub mode: u32,
    /// User ids admitted besides the sidecar's own (root is always admitted).
    pub allowed_uids: Vec<u32>,
}

type Deliver = dyn Fn(SidecarEvent) + Send + Sync;

struct ServerInner {
    path: PathBuf,
    listener: UnixListener,
    own_uid: u32,
    allowed_uids: Vec<u32>,
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    deliver: Box<Deliver>,
}

/// A listening sidecar socket. Events reach the `deliver` function given to
/// [`SidecarServer::bind`] from the server's threads.
pub struct SidecarServer {
    inner: Arc<ServerInner>,
}

impl SidecarServer {
    /// Listens on `options.path` (a stale socket there is replaced; a live one or any
    /// other file is refused) and starts admitting workers.
    pub fn bind(options: SidecarOptions, deliver: Box<Deliver>) -> Result<SidecarServer> {
        let path = options.path;
        let shown = path.display().to_string();
        if options.mode > 0o777 {
            return Err(Error::invalid(
                "mode",
                format!("{:o} given; permission bits are at most 777", options.mode),
            ));
        }
        claim_path(&path)?;
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(shown.clone(), "listen on the socket", e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(options.mode))
            .map_err(|e| Error::io(shown.clone(), "set the socket's mode", e))?;
        let inner = Arc::new(ServerInner {
            path,
            listener,
            own_uid: rustix::process::getuid().as_raw(),
            allowed_uids: options.allowed_uids,
            connections: Mutex::default(),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            deliver,
        });
        let accepting = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("kvt-sidecar".into())
            .spawn(move || accept_loop(&accepting))
            .map_err(|e| Error::io(shown, "thread spawn", e))?;
        Ok(SidecarServer { inner })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Sends `body` to connection `conn` as answer `id` (0: an event); never blocks.
    /// `Err(Closed)` when the connection is gone.
    pub fn send(&self, conn: u64, id: u32, body: &[u8]) -> Result<()> {
        let connection = lock(&self.inner.connections).get(&conn).cloned();
        match connection {
            Some(connection) => connection.send(id, body),
            None => Err(Error::Closed),
        }
    }

    /// Ends connection `conn` (its `Closed` event follows).
    pub fn disconnect(&self, conn: u64) {
        if let Some(connection) = lock(&self.inner.connections).get(&conn) {
            connection.shut_down();
        }
    }

    /// Routes connection `conn`'s `write` requests that name peer `key` to the engine
    /// directly (see `route.rs`); `default_timeout` applies to requests without one.
    /// False when the connection is gone.
    pub fn route_peer(
        &self,
        conn: u64,
        engine: &Engine,
        default_timeout: Option<Duration>,
        key: String,
        peer: PeerHandle,
    ) -> bool {
        let Some(connection) = self.connection(conn) else {
            return false;
        };
        connection
            .route_or(|| WorkerRoute::new(engine.clone(), default_timeout))
            .add_peer(key, peer);
        true
    }

    /// Routes `write` requests of connection `conn` naming prepared list `handle`.
    pub fn route_prepared(&self, conn: u64, handle: u32, list: Arc<PreparedBlocks>) {
        if let Some(route) = self.connection(conn).and_then(|c| c.route()) {
            route.add_prepared(handle, list);
        }
    }

    /// Forgets prepared list `handle` of connection `conn`.
    pub fn unroute_prepared(&self, conn: u64, handle: u32) {
        if let Some(route) = self.connection(conn).and_then(|c| c.route()) {
            route.remove_prepared(handle);
        }
    }

    /// Every `write` of connection `conn` goes to the serving layer again (before its
    /// communicator closes).
    pub fn unroute(&self, conn: u64) {
        if let Some(connection) = self.connection(conn) {
            connection.unroute();
        }
    }

    fn connection(&self, conn: u64) -> Option<Arc<Connection>> {
        lock(&self.inner.connections).get(&conn).cloned()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        lock(&self.inner.connections).len()
    }

    /// Stops admitting, ends every connection and removes the socket file.
    pub fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wakes the accepting thread (Linux answers its accept with EINVAL).
        let _ = rustix::net::shutdown(&self.inner.listener, rustix::net::Shutdown::Both);
        for connection in lock(&self.inner.connections).values() {
            connection.shut_down();
        }
        let _ = std::fs::remove_file(&self.inner.path);
    }
}

impl Drop for SidecarServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Makes `path` free to bind: a socket no sidecar answers on is removed; a live sidecar's
/// socket or a file of another kind is refused.
fn claim_path(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display().to_string();
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(Error::invalid(
            "socket",
            format!("{shown} exists and is not a socket; choose another path or remove it"),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(Error::invalid(
            "socket",
            format!("another sidecar serves {shown}; stop it or choose another path"),
        ));
    }
    std::fs::remove_file(path).map_err(|e| Error::io(shown, "remove the stale socket", e))
}

fn accept_loop(server: &Arc<ServerInner>) {
    loop {
        let stream = match server.listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if server.closed.load(Ordering::SeqCst) => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!("sidecar: accept failed ({e}); retrying");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if server.closed.load(Ordering::SeqCst) {
            return;
        }
        admit(server, stream);
    }
}

/// Checks the worker's credentials; an admitted worker gets its threads and a
/// `Connected` event, a refused one an `ERR_AUTH` frame and the end of the connection.
fn admit(server: &Arc<ServerInner>, stream: UnixStream) {
    let credentials = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(c) => c,
        Err(e) => {
            debug!("sidecar: no peer credentials ({e}); connection refused");
            return;
        }
    };
    let uid = credentials.uid.as_raw();
    let pid = credentials.pid.as_raw_nonzero().get();
    if uid != 0 && uid != server.own_uid && !server.allowed_uids.contains(&uid) {
        let refusal = format!(
            "{{\"error\":{{\"code\":\"ERR_AUTH\",\"message\":\"uid {uid} (pid {pid}) may not attach: the sidecar admits uid {} and root{}\"}}}}",
            server.own_uid,
            if server.allowed_uids.is_empty() { " (add --allow-uid to admit others)".to_string() } else { format!(" and --allow-uid {:?}", server.allowed_uids) }
        );
        let connection = Connection::new(0, stream);
        let _ = connection.send(0, refusal.as_bytes());
        connection.shut_down();
        debug!("sidecar: refused uid {uid} (pid {pid})");
        return;
    }
    let id = server.next_id.fetch_add(1, Ordering::Relaxed);
    let connection = Arc::new(Connection::new(id, stream));
    lock(&server.connections).insert(id, Arc::clone(&connection));
    (server.deliver)(SidecarEvent::Connected { conn: id, pid, uid });
    let writer = Arc::clone(&connection);
    let spawned_writer = std::thread::Builder::new()
        .name("kvt-sidecar-out".into())
        .spawn(move || writer.write_queued());
    let reading = Arc::clone(server);
    let spawned_reader = spawned_writer.and_then(|_| {
        std::thread::Builder::new()
            .name("kvt-sidecar-in".into())
            .spawn(move || {
                let reason = connection.read_frames(&*reading.deliver);
                connection.shut_down();
                lock(&reading.connections).remove(&id);
                (reading.deliver)(SidecarEvent::Closed { conn: id, reason });
            })
    });
    if let Err(e) = spawned_reader {
        if let Some(connection) = lock(&server.connections).remove(&id) {
            connection.shut_down();
        }
        (server.deliver)(SidecarEvent::Closed {
            conn: id,
            reason: format!("thread spawn failed ({e})"),
        });
    }
}

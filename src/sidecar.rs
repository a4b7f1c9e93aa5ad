//! The sidecar's socket for the TypeScript `serve` command: events of the engine's
//! [`SidecarServer`] become calls of one JS function; answers go back through `send`.

use crate::calls::PeerCalls;
use crate::errors::{napi_failure, to_js_error, Code};
use kvtransfer_engine::{lock, PreparedBlocks, SidecarEvent, SidecarOptions, SidecarServer};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::os::fd::IntoRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the sidecar listens.
#[napi(object)]
pub struct NativeSidecarOptions {
    /// The socket's path.
    pub path: String,
    /// The socket file's permission bits (default 0o600).
    pub mode: Option<u32>,
    /// User ids admitted besides the sidecar's own and root.
    pub allowed_uids: Option<Vec<u32>>,
}

/// One event of the sidecar's socket (`kind`: "connected", "message" or "closed").
#[napi(object)]
pub struct NativeSidecarEvent {
    pub kind: String,
    pub conn: u32,
    /// A message's request id.
    pub id: Option<u32>,
    /// A message's body.
    pub body: Option<Buffer>,
    /// Descriptors received with a message, now the caller's to close.
    pub fds: Option<Vec<i32>>,
    /// A connected worker's process id.
    pub pid: Option<i32>,
    /// A connected worker's user id.
    pub uid: Option<u32>,
    /// Why a connection closed.
    pub reason: Option<String>,
}

type EventCallback =
    ThreadsafeFunction<NativeSidecarEvent, (), NativeSidecarEvent, Status, false, false>;

/// The sidecar's listening socket; use `kvtransfer serve` (the TypeScript `serve`).
#[napi]
pub struct NativeSidecar {
    server: SidecarServer,
    /// Emptied at close, so that the process may exit.
    callback: Arc<Mutex<Option<Arc<EventCallback>>>>,
}

fn to_js_event(event: SidecarEvent) -> NativeSidecarEvent {
    let empty = |kind: &str, conn: u64| NativeSidecarEvent {
        kind: kind.to_string(),
        conn: conn as u32,
        id: None,
        body: None,
        fds: None,
        pid: None,
        uid: None,
        reason: None,
    };
    match event {
        SidecarEvent::Connected { conn, pid, uid } => NativeSidecarEvent {
            pid: Some(pid),
            uid: Some(uid),
            ..empty("connected", conn)
        },
        SidecarEvent::Message {
            conn,
            id,
            body,
            fds,
        } => NativeSidecarEvent {
            id: Some(id),
            body: Some(body.into()),
            fds: Some(fds.into_iter().map(IntoRawFd::into_raw_fd).collect()),
            ..empty("message", conn)
        },
        SidecarEvent::Closed { conn, reason } => NativeSidecarEvent {
            reason: Some(reason),
            ..empty("closed", conn)
        },
    }
}

#[napi]
impl NativeSidecar {
    /// Listens on `options.path`; `onEvent` gets every event (it holds the process open
    /// until `close`).
    #[napi(constructor)]
    pub fn new(
        options: NativeSidecarOptions,
        on_event: Function<NativeSidecarEvent, ()>,
    ) -> Result<Self, Code> {
        let tsfn: Arc<EventCallback> = Arc::new(
            on_event
                .build_threadsafe_function()
                .callee_handled::<false>()
                .build()
                .map_err(napi_failure)?,
        );
        let callback = Arc::new(Mutex::new(Some(tsfn)));
        let slot = Arc::clone(&callback);
        let server = SidecarServer::bind(
            SidecarOptions {
                path: options.path.into(),
                mode: options.mode.unwrap_or(0o600),
                allowed_uids: options.allowed_uids.unwrap_or_default(),
            },
            Box::new(move |event| {
                if let Some(tsfn) = lock(&slot).clone() {
                    tsfn.call(to_js_event(event), ThreadsafeFunctionCallMode::NonBlocking);
                }
            }),
        )
        .map_err(to_js_error)?;
        Ok(NativeSidecar { server, callback })
    }

    /// Sends `body` to connection `conn` as answer `id` (0: an event); never blocks.
    /// Throws `ERR_CLOSED` when the connection is gone.
    #[napi]
    pub fn send(&self, conn: u32, id: u32, body: &[u8]) -> Result<(), Code> {
        self.server
            .send(u64::from(conn), id, body)
            .map_err(to_js_error)
    }

    /// Ends connection `conn` (its "closed" event follows).
    #[napi]
    pub fn disconnect(&self, conn: u32) {
        self.server.disconnect(u64::from(conn));
    }

    /// Routes connection `conn`'s `write` requests naming `key` ("ip:port") straight to
    /// the engine through the peer handle `peer` (`NativeCommunicator.peer`), with
    /// `defaultTimeoutMs` for requests without one (0: none). False: the connection is gone.
    #[napi]
    pub fn route_peer(
        &self,
        conn: u32,
        key: String,
        #[napi(ts_arg_type = "ExternalObject<'Peer'>")] peer: &External<PeerCalls>,
        default_timeout_ms: f64,
    ) -> bool {
        let timeout = (default_timeout_ms.is_finite() && default_timeout_ms > 0.0)
            .then(|| Duration::from_secs_f64(default_timeout_ms.min(3.1e10) / 1000.0));
        self.server.route_peer(
            u64::from(conn),
            peer.engine(),
            timeout,
            key,
            peer.handle().clone(),
        )
    }

    /// Routes `write` requests of connection `conn` naming prepared list `handle`
    /// (`NativePreparedBlocks.list`).
    #[napi]
    pub fn route_prepared(
        &self,
        conn: u32,
        handle: u32,
        #[napi(ts_arg_type = "ExternalObject<'PreparedList'>")] list: &External<
            Arc<PreparedBlocks>,
        >,
    ) {
        self.server
            .route_prepared(u64::from(conn), handle, Arc::clone(list));
    }

    /// Forgets prepared list `handle` of connection `conn`.
    #[napi]
    pub fn unroute_prepared(&self, conn: u32, handle: u32) {
        self.server.unroute_prepared(u64::from(conn), handle);
    }

    /// Every `write` of connection `conn` goes to `onEvent` again.
    #[napi]
    pub fn unroute(&self, conn: u32) {
        self.server.unroute(u64::from(conn));
    }

    /// Connections open now.
    #[napi(getter)]
    pub fn connections(&self) -> u32 {
        self.server.connections() as u32
    }

    /// Stops admitting, ends every connection, removes the socket file and lets the
    /// process exit.
    #[napi]
    pub fn close(&self) {
        self.server.close();
        lock(&self.callback).take();
    }
}

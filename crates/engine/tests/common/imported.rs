//! Imported regions for the engine's tests: a shared file in /dev/shm, imported as the
//! sidecar imports a worker's memory.

use kvtransfer_engine::{
    Engine, EngineOptions, ImportSource, ImportSpec, Importer, RdmaSettings, Role, TpOptions,
};
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

pub const BLOCKS: usize = 16;
pub const BLOCK_BYTES: usize = 1024;
/// Each region starts this far into its file (not page-aligned on purpose).
pub const OFFSET: u64 = 512;

/// A shared file in /dev/shm (removed on drop), as a worker would share its cache.
pub struct Shared(PathBuf);

impl Shared {
    pub fn new(name: &str) -> Shared {
        let path = PathBuf::from(format!("/dev/shm/kvt-swap-{}-{name}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(OFFSET + (BLOCKS * BLOCK_BYTES) as u64)
            .unwrap();
        Shared(path)
    }

    pub fn fd(&self) -> OwnedFd {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.0)
            .unwrap()
            .into()
    }

    pub fn block(&self, block: usize) -> Vec<u8> {
        let bytes = std::fs::read(&self.0).unwrap();
        let at = OFFSET as usize + block * BLOCK_BYTES;
        bytes[at..at + BLOCK_BYTES].to_vec()
    }

    pub fn spec(&self, bytes: u64) -> ImportSpec {
        ImportSpec {
            source: ImportSource::HostFd(self.fd()),
            offset: OFFSET,
            bytes,
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A decode engine over `shared`'s memory, imported as the sidecar imports a worker's.
pub fn decode_over(shared: &Shared, transport: &str, rdma: Option<RdmaSettings>) -> Engine {
    let imported = Importer::new(0)
        .import(
            "localKeyCache",
            0,
            shared.spec((BLOCKS * BLOCK_BYTES) as u64),
        )
        .unwrap();
    Engine::new(EngineOptions {
        role: Role::Decode,
        gpu_idx: 0,
        name: "decode-test".into(),
        host: None,
        keys: vec![imported.address()],
        values: Vec::new(),
        key_scales: Vec::new(),
        value_scales: Vec::new(),
        block_number: BLOCKS as u32,
        block_bytes: BLOCK_BYTES as u64,
        scale_block_bytes: 0,
        transport: Some(transport.into()),
        arrivals: None,
        connect_timeout: Duration::from_secs(10),
        rdma_settings: rdma,
        rdma_devices: None,
        auth_token: Some(Vec::new()),
        tp: TpOptions::default(),
        imports: vec![imported],
    })
    .unwrap()
}

//! The NVLink endpoint in a descriptor, and the identities it carries: which host and
//! network namespace (only processes of one host, able to reach each other's abstract Unix
//! sockets, can share GPU memory), which process (one process maps its own memory as is),
//! and which GPUs (by UUID: ordinals differ between processes).

use crate::wire::{DecodeError, Reader};
use std::sync::OnceLock;

/// GPUs one endpoint may list.
pub(crate) const MAX_GPUS: usize = 64;
/// Longest host identity and socket name.
const MAX_TEXT: usize = 512;

/// A connector's offer or an acceptor's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvlinkEndpoint {
    /// Boot id and hostname: the same only for processes of one running host.
    pub host: String,
    /// The network namespace (abstract Unix sockets are per namespace).
    pub netns: u64,
    /// A random token of the process (equal tokens: the same process).
    pub process: u64,
    /// The GPU that runs this side's copies (its `gpuIdx`).
    pub gpu: [u8; 16],
    /// Offer: every GPU that `gpu` can reach (peer access, itself included).
    /// Reply: the GPUs holding the acceptor's regions.
    pub gpus: Vec<[u8; 16]>,
    /// Reply: the acceptor's abstract socket name (empty in an offer).
    pub socket: String,
    /// Reply: the session that admits one connection on that socket (0 in an offer).
    pub session: u64,
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn text(r: &mut Reader<'_>, what: &str) -> Result<String, DecodeError> {
    let len = r.u16(what)? as usize;
    if len > MAX_TEXT {
        return Err(DecodeError(format!(
            "{what}: {len} bytes (at most {MAX_TEXT})"
        )));
    }
    String::from_utf8(r.take(len, what)?.to_vec())
        .map_err(|_| DecodeError(format!("{what} is not UTF-8")))
}

impl NvlinkEndpoint {
    /// Its wire form (little endian; texts and the GPU list length-prefixed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.host.len() + 16 * self.gpus.len());
        put_text(&mut out, &self.host);
        out.extend_from_slice(&self.netns.to_le_bytes());
        out.extend_from_slice(&self.process.to_le_bytes());
        out.extend_from_slice(&self.gpu);
        out.push(self.gpus.len() as u8);
        for gpu in &self.gpus {
            out.extend_from_slice(gpu);
        }
        put_text(&mut out, &self.socket);
        out.extend_from_slice(&self.session.to_le_bytes());
        out
    }

    /// Parses an endpoint; refuses texts over 512 bytes, more than 64 GPUs,
    /// and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<NvlinkEndpoint, DecodeError> {
        let mut r = Reader::new(bytes);
        let host = text(&mut r, "host identity")?;
        let netns = r.u64("network namespace")?;
        let process = r.u64("process token")?;
        let gpu = r.array::<16>("gpu uuid")?;
        let count = r.u8("gpu count")? as usize;
        if count > MAX_GPUS {
            return Err(DecodeError(format!("{count} GPUs (at most {MAX_GPUS})")));
        }
        let mut gpus = Vec::with_capacity(count);
        for _ in 0..count {
            gpus.push(r.array::<16>("gpu uuid")?);
        }
        let socket = text(&mut r, "socket name")?;
        let session = r.u64("session")?;
        r.finish("NVLink endpoint")?;
        Ok(NvlinkEndpoint {
            host,
            netns,
            process,
            gpu,
            gpus,
            socket,
            session,
        })
    }
}

/// `boot-id/hostname` of this host.
pub(crate) fn host_identity() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        format!(
            "{}/{}",
            read("/proc/sys/kernel/random/boot_id"),
            read("/proc/sys/kernel/hostname")
        )
    })
    .clone()
}

/// The inode of this process's network namespace (0 when it cannot be read).
pub(crate) fn network_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino())
}

/// This process's random token.
pub(crate) fn process_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    *TOKEN.get_or_init(crate::util::random_u64)
}

// A GPU UUID as `nvidia-smi` prints it (`GPU-xxxxxxxx-xxxx-...`), from crates/cuda.
pub(crate) use kvtransfer_cuda::uuid_text;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips_and_rejects_truncation() {
        let endpoint = NvlinkEndpoint {
            host: host_identity(),
            netns: network_namespace(),
            process: process_token(),
            gpu: [7; 16],
            gpus: vec![[7; 16], [9; 16]],
            socket: "kvtransfer-nvlink-1-2".into(),
            session: 42,
        };
        let bytes = endpoint.encode();
        assert_eq!(NvlinkEndpoint::decode(&bytes).unwrap(), endpoint);
        for cut in 0..bytes.len() {
            assert!(NvlinkEndpoint::decode(&bytes[..cut]).is_err());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(NvlinkEndpoint::decode(&long).is_err());
    }

    #[test]
    fn identities_are_stable_and_uuids_print_like_nvidia_smi() {
        assert_eq!(host_identity(), host_identity());
        assert!(host_identity().contains('/'));
        assert_eq!(process_token(), process_token());
        assert_eq!(
            uuid_text(&[0xab; 16]),
            "GPU-abababab-abab-abab-abab-abababababab"
        );
    }
}

//! What the RDMA transport says it uses on this side: its rails, each with its port, speed
//! and the GID it would pick (and why).

/// One rail as opened on this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaRailDetails {
    /// The RDMA device's name (e.g. `mlx5_0`).
    pub device: String,
    /// The active port used (1-based).
    pub port: u8,
    /// The port's active speed, Mb/s (its weight in the split of a call's bytes).
    pub speed_mbps: u32,
    /// The GID table index this rail prefers (per peer, the first GID in the peer's subnet).
    pub gid_index: u8,
    /// That GID: its IPv4 address where it maps one, else the IPv6 form.
    pub gid: String,
    /// Why that GID leads.
    pub gid_reason: String,
}

/// What the RDMA transport uses on this side. The single-valued fields describe the first
/// rail; `rails` lists every one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaDetails {
    /// The first rail's RDMA device (e.g. `mlx5_0`).
    pub device: String,
    /// Its active port (1-based, as verbs numbers them).
    pub port: u8,
    /// InfiniBand, else RoCE.
    pub infiniband: bool,
    /// The GID table index the first rail prefers as its source GID.
    pub gid_index: u8,
    /// That GID: its IPv4 address on RoCE where it maps one, else its bytes.
    pub gid: String,
    /// The path MTU in bytes.
    pub mtu: u32,
    /// RC queue pairs created per peer and rail.
    pub qps_per_peer: u16,
    /// Every rail (RDMA device port) this side writes over.
    pub rails: Vec<RdmaRailDetails>,
}

impl RdmaDetails {
    fn link_layer(&self) -> &'static str {
        if self.infiniband {
            "InfiniBand"
        } else {
            "RoCE"
        }
    }

    /// `rxe0 port 1, GID index 1 (RoCE, 10.77.0.1), MTU 1024, 2 QPs` (with `, 2 rails:
    /// rxe0+rxe1` when there are several).
    pub(crate) fn summary(&self) -> String {
        let rails = if self.rails.len() > 1 {
            format!(
                ", {} rails: {}",
                self.rails.len(),
                self.rails
                    .iter()
                    .map(|r| r.device.as_str())
                    .collect::<Vec<_>>()
                    .join("+")
            )
        } else {
            String::new()
        };
        format!(
            "{} port {}, GID index {} ({}, {}), MTU {}, {} QPs{rails}",
            self.device,
            self.port,
            self.gid_index,
            self.link_layer(),
            self.gid,
            self.mtu,
            self.qps_per_peer
        )
    }

    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("device", self.device.clone()),
            ("port", self.port.to_string()),
            ("linkLayer", self.link_layer().to_string()),
            ("gidIndex", self.gid_index.to_string()),
            ("gid", self.gid.clone()),
            ("mtu", self.mtu.to_string()),
            ("qpsPerPeer", self.qps_per_peer.to_string()),
            (
                "rails",
                self.rails
                    .iter()
                    .map(|r| {
                        format!(
                            "{} port {} ({} Mb/s): GID {}",
                            r.device, r.port, r.speed_mbps, r.gid_reason
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        ]
    }
}

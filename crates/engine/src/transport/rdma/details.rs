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
    /// Sets of `qps_per_peer` per rail and peer: 1, or with several rails 1 + the spare
    /// sets a quarantined rail rejoins on.
    pub qp_sets: u16,
    /// Every rail (RDMA device port) this side writes over.
    pub rails: Vec<RdmaRailDetails>,
    /// Why these devices: named (`rdmaDevices`, `KVCACHE_RDMA_NICS`), nearest the GPU (and
    /// how near each is), or every active port.
    pub nics: String,
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

    /// `12 QPs (2 rails × 2 QPs × 3 sets); CQs: 2 per rail, shared by every peer`.
    pub(crate) fn per_peer(&self) -> String {
        let rails = self.rails.len().max(1);
        let qps = rails * usize::from(self.qps_per_peer) * usize::from(self.qp_sets);
        let sets = if self.qp_sets > 1 {
            format!(" × {} sets (spares for rejoins)", self.qp_sets)
        } else {
            String::new()
        };
        format!(
            "{qps} QPs ({rails} rails × {} QPs{sets}) on each side; CQs: 2 per rail, shared by every peer",
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
            ("resourcesPerPeer", self.per_peer()),
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
            ("nics", self.nics.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(rails: usize, qp_sets: u16) -> RdmaDetails {
        let rail = RdmaRailDetails {
            device: "rxe0".into(),
            port: 1,
            speed_mbps: 2500,
            gid_index: 1,
            gid: "10.77.0.1".into(),
            gid_reason: String::new(),
        };
        RdmaDetails {
            device: "rxe0".into(),
            port: 1,
            infiniband: false,
            gid_index: 1,
            gid: "10.77.0.1".into(),
            mtu: 1024,
            qps_per_peer: 2,
            qp_sets,
            rails: vec![rail; rails],
            nics: String::new(),
        }
    }

    #[test]
    fn the_per_peer_arithmetic_counts_rails_qps_and_spare_sets() {
        assert!(details(1, 1)
            .per_peer()
            .starts_with("2 QPs (1 rails × 2 QPs) on each side"));
        assert!(details(2, 3)
            .per_peer()
            .starts_with("12 QPs (2 rails × 2 QPs × 3 sets (spares for rejoins)) on each side"));
    }
}

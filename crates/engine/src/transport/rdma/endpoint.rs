//! The RDMA endpoint one side offers in its descriptor: per rail (one RDMA device port),
//! how to reach its queue pairs, which GIDs it could use, and where its registered regions
//! are. A connector offers every rail it opened; the acceptor answers with the rails it
//! paired (each naming the connector's rail and GID it pairs with) and, for each of the
//! connector's rails it left out, why.

use crate::wire::{DecodeError, Reader};

/// Queue pairs one rail may announce: up to 64 per peer, times the sets kept for rejoins.
pub(crate) const MAX_QPS_PER_RAIL: usize = 256;
pub(crate) const MAX_NOTICE_SLOTS: u32 = 1 << 16;
/// Rails one endpoint may carry (RDMA devices per communicator).
pub const MAX_RAILS: usize = crate::config::MAX_RDMA_DEVICES;
/// GID candidates one rail may announce.
pub const MAX_GIDS: usize = 16;
/// Longest device name and refusal reason carried.
pub(super) const MAX_DEVICE_BYTES: usize = 64;
const MAX_REASON_BYTES: usize = 512;
/// Regions one endpoint may announce (MAX_LAYERS × K and V).
pub(super) const MAX_REGIONS: usize = 2 * crate::layout::MAX_LAYERS as usize;

/// One RC queue pair's connection data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// The queue pair's number.
    pub qp_num: u32,
    /// Its initial packet sequence number (24 bits; higher bits are dropped on decode).
    pub psn: u32,
}

/// A GID a rail could use as its source address, as the peer needs to judge reachability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidCandidate {
    /// The GID's 16 bytes (an IPv4-mapped or IPv6 address on RoCE).
    pub gid: [u8; 16],
    /// RoCE v2 (routable, UDP) rather than RoCE v1 / InfiniBand.
    pub v2: bool,
    /// The prefix length of the address on its interface (0: unknown).
    pub prefix: u8,
}

/// One rail: a device port's addressing, queue pairs and region keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailEndpoint {
    /// The RDMA device's name (for reports).
    pub device: String,
    /// In an offer: this rail's own index. In a reply: the connector's rail it pairs with.
    pub peer_rail: u8,
    /// The port's LID (the address used on InfiniBand).
    pub lid: u16,
    /// In an offer: the GIDs this rail could use, most preferred first. In a reply: the
    /// acceptor's chosen GID, then the connector's GID the connector must use.
    pub gids: Vec<GidCandidate>,
    /// ibv_mtu enum value of the port's active MTU.
    pub mtu: u8,
    /// Whether the port is native InfiniBand (route by LID) rather than RoCE (route by GID).
    pub infiniband: bool,
    /// The port's active speed in Mb/s (weights the split of a call's bytes).
    pub speed_mbps: u32,
    /// The queue pairs of this side's end of the rail, paired by position: sets of
    /// `KVCACHE_RDMA_QPS_PER_PEER`, the first in use, the others kept for rejoins.
    pub qps: Vec<QpEndpoint>,
    /// (address, rkey) of every region, in region-table order, under this rail's device.
    pub regions: Vec<(u64, u32)>,
    /// The acceptor's arrival-notice ring for this peer under this rail's device: address,
    /// rkey, slot count (all zero in a connector's offer).
    pub notice_ring: (u64, u32, u32),
}

/// Where a peer's memory is and how to reach its queue pairs, over one or more rails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaEndpoint {
    /// The rails (1..=8).
    pub rails: Vec<RailEndpoint>,
    /// In a reply: each connector rail the acceptor did not pair, and why.
    pub refused: Vec<(u8, String)>,
}

pub(super) fn put_str(out: &mut Vec<u8>, text: &str, max: usize) {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

pub(super) fn get_str(r: &mut Reader<'_>, what: &str, max: usize) -> Result<String, DecodeError> {
    let len = r.u16(what)? as usize;
    if len > max {
        return Err(DecodeError(format!("{what} of {len} bytes exceeds {max}")));
    }
    let bytes = r.take(len, what)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError(format!("{what} is not UTF-8")))
}

impl RailEndpoint {
    fn encode_into(&self, out: &mut Vec<u8>) {
        put_str(out, &self.device, MAX_DEVICE_BYTES);
        out.push(self.peer_rail);
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.push(self.gids.len() as u8);
        for g in &self.gids {
            out.extend_from_slice(&g.gid);
            out.push(u8::from(g.v2));
            out.push(g.prefix);
        }
        out.push(self.mtu);
        out.push(u8::from(self.infiniband));
        out.extend_from_slice(&self.speed_mbps.to_le_bytes());
        out.extend_from_slice(&(self.qps.len() as u16).to_le_bytes());
        for qp in &self.qps {
            out.extend_from_slice(&qp.qp_num.to_le_bytes());
            out.extend_from_slice(&qp.psn.to_le_bytes());
        }
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (addr, rkey) in &self.regions {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&rkey.to_le_bytes());
        }
        out.extend_from_slice(&self.notice_ring.0.to_le_bytes());
        out.extend_from_slice(&self.notice_ring.1.to_le_bytes());
        out.extend_from_slice(&self.notice_ring.2.to_le_bytes());
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<RailEndpoint, DecodeError> {
        let device = get_str(r, "device name", MAX_DEVICE_BYTES)?;
        let peer_rail = r.u8("rail index")?;
        let lid = r.u16("lid")?;
        let gid_count = r.u8("gid count")? as usize;
        if gid_count == 0 || gid_count > MAX_GIDS {
            return Err(DecodeError(format!(
                "gid count {gid_count} outside 1..={MAX_GIDS}"
            )));
        }
        let mut gids = Vec::with_capacity(gid_count);
        for _ in 0..gid_count {
            let gid = r.array::<16>("gid")?;
            let v2 = r.bool("gid type")?;
            let prefix = r.u8("gid prefix")?;
            if prefix > 128 {
                return Err(DecodeError(format!("gid prefix {prefix} exceeds 128")));
            }
            gids.push(GidCandidate { gid, v2, prefix });
        }
        let mtu = r.u8("mtu")?;
        if !(1..=5).contains(&mtu) {
            return Err(DecodeError(format!("mtu code {mtu} outside 1..=5")));
        }
        let infiniband = r.bool("link layer")?;
        let speed_mbps = r.u32("speed")?;
        let qp_count = r.u16("qp count")? as usize;
        if qp_count == 0 || qp_count > MAX_QPS_PER_RAIL {
            return Err(DecodeError(format!(
                "qp count {qp_count} outside 1..={MAX_QPS_PER_RAIL}"
            )));
        }
        let mut qps = Vec::with_capacity(qp_count);
        for _ in 0..qp_count {
            qps.push(QpEndpoint {
                qp_num: r.u32("qp number")?,
                psn: r.u32("psn")? & 0x00ff_ffff,
            });
        }
        let region_count = r.u32("region count")? as usize;
        if region_count == 0 || region_count > MAX_REGIONS {
            return Err(DecodeError(format!(
                "{region_count} regions announced; 1..={MAX_REGIONS} allowed"
            )));
        }
        let mut regions = Vec::with_capacity(region_count);
        for _ in 0..region_count {
            regions.push((r.u64("region address")?, r.u32("rkey")?));
        }
        let notice_ring = (
            r.u64("notice ring address")?,
            r.u32("notice ring rkey")?,
            r.u32("notice ring slots")?,
        );
        if notice_ring.2 > MAX_NOTICE_SLOTS {
            return Err(DecodeError(format!(
                "{} notice slots exceed {MAX_NOTICE_SLOTS}",
                notice_ring.2
            )));
        }
        Ok(RailEndpoint {
            device,
            peer_rail,
            lid,
            gids,
            mtu,
            infiniband,
            speed_mbps,
            qps,
            regions,
            notice_ring,
        })
    }
}

impl RdmaEndpoint {
    /// Its wire form (little endian; every list count-prefixed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(self.rails.len() as u8);
        for rail in &self.rails {
            rail.encode_into(&mut out);
        }
        out.push(self.refused.len() as u8);
        for (rail, reason) in &self.refused {
            out.push(*rail);
            put_str(&mut out, reason, MAX_REASON_BYTES);
        }
        out
    }

    /// Parses an endpoint; refuses a rail, GID, queue pair or region count out of bounds,
    /// an MTU code outside 1..=5, too many notice slots, and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<RdmaEndpoint, DecodeError> {
        let mut r = Reader::new(bytes);
        let rail_count = r.u8("rail count")? as usize;
        if rail_count == 0 || rail_count > MAX_RAILS {
            return Err(DecodeError(format!(
                "rail count {rail_count} outside 1..={MAX_RAILS}"
            )));
        }
        let mut rails = Vec::with_capacity(rail_count);
        for _ in 0..rail_count {
            rails.push(RailEndpoint::decode_from(&mut r)?);
        }
        let refused_count = r.u8("refused rail count")? as usize;
        if refused_count > MAX_RAILS {
            return Err(DecodeError(format!(
                "{refused_count} refused rails exceed {MAX_RAILS}"
            )));
        }
        let mut refused = Vec::with_capacity(refused_count);
        for _ in 0..refused_count {
            let rail = r.u8("refused rail")?;
            refused.push((rail, get_str(&mut r, "refusal reason", MAX_REASON_BYTES)?));
        }
        r.finish("RDMA endpoint")?;
        Ok(RdmaEndpoint { rails, refused })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rail(device: &str) -> RailEndpoint {
        RailEndpoint {
            device: device.into(),
            peer_rail: 0,
            lid: 0,
            gids: vec![GidCandidate {
                gid: [7; 16],
                v2: true,
                prefix: 24,
            }],
            mtu: 3,
            infiniband: false,
            speed_mbps: 100_000,
            qps: vec![QpEndpoint {
                qp_num: 17,
                psn: 0x123456,
            }],
            regions: vec![(0x1000, 1), (0x2000, 2), (0x3000, 3), (0x4000, 4)],
            notice_ring: (0x9000, 5, 256),
        }
    }

    fn sample() -> RdmaEndpoint {
        RdmaEndpoint {
            rails: vec![rail("mlx5_0"), rail("mlx5_1")],
            refused: vec![(2, "no GID reaches the peer".into())],
        }
    }

    #[test]
    fn round_trips_and_rejects_every_truncation() {
        let bytes = sample().encode();
        assert_eq!(RdmaEndpoint::decode(&bytes).unwrap(), sample());
        for cut in 0..bytes.len() {
            assert!(RdmaEndpoint::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes;
        long.push(0);
        assert!(RdmaEndpoint::decode(&long).is_err());
    }

    #[test]
    fn refuses_too_many_rails_and_gids() {
        let mut many = sample();
        many.rails = vec![rail("x"); MAX_RAILS + 1];
        let error = RdmaEndpoint::decode(&many.encode()).unwrap_err();
        assert!(error.0.contains("rail count 9"), "{}", error.0);
        let mut gids = sample();
        gids.rails[0].gids = Vec::new();
        assert!(RdmaEndpoint::decode(&gids.encode()).is_err());
    }
}

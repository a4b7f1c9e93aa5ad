//! The RDMA endpoint one side offers in its descriptor: how to reach its queue pairs and
//! where its registered regions are.

use crate::wire::{DecodeError, Reader};

pub(crate) const MAX_QPS_PER_PEER: usize = 64;
pub(crate) const MAX_NOTICE_SLOTS: u32 = 1 << 16;
/// Regions one endpoint may announce (MAX_LAYERS × K and V).
const MAX_REGIONS: usize = 2 * crate::layout::MAX_LAYERS as usize;

/// One RC queue pair's connection data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// The queue pair's number.
    pub qp_num: u32,
    /// Its initial packet sequence number (24 bits; higher bits are dropped on decode).
    pub psn: u32,
}

/// Where a peer's memory is and how to reach its queue pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaEndpoint {
    /// The port's LID (the address used on InfiniBand).
    pub lid: u16,
    /// The port's GID at the chosen index (the address used on RoCE).
    pub gid: [u8; 16],
    /// ibv_mtu enum value of the port's active MTU.
    pub mtu: u8,
    /// Whether the port is native InfiniBand (route by LID) rather than RoCE (route by GID).
    pub infiniband: bool,
    /// The queue pairs of this side's end of the link (1..=64), paired by position.
    pub qps: Vec<QpEndpoint>,
    /// (address, rkey) of every region, in region-table order.
    pub regions: Vec<(u64, u32)>,
    /// The acceptor's arrival-notice ring for this peer: address, rkey, slot count
    /// (all zero in a connector's offer).
    pub notice_ring: (u64, u32, u32),
}

impl RdmaEndpoint {
    /// Its wire form (little endian; the queue pair and region lists count-prefixed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + 8 * self.qps.len() + 12 * self.regions.len());
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&self.gid);
        out.push(self.mtu);
        out.push(u8::from(self.infiniband));
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
        out
    }

    /// Parses an endpoint; refuses an MTU code outside 1..=5, a queue pair or region count
    /// out of bounds, too many notice slots, and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<RdmaEndpoint, DecodeError> {
        let mut r = Reader::new(bytes);
        let lid = r.u16("lid")?;
        let gid = r.array::<16>("gid")?;
        let mtu = r.u8("mtu")?;
        if !(1..=5).contains(&mtu) {
            return Err(DecodeError(format!("mtu code {mtu} outside 1..=5")));
        }
        let infiniband = r.bool("link layer")?;
        let qp_count = r.u16("qp count")? as usize;
        if qp_count == 0 || qp_count > MAX_QPS_PER_PEER {
            return Err(DecodeError(format!(
                "qp count {qp_count} outside 1..={MAX_QPS_PER_PEER}"
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
        r.finish("RDMA endpoint")?;
        Ok(RdmaEndpoint {
            lid,
            gid,
            mtu,
            infiniband,
            qps,
            regions,
            notice_ring,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RdmaEndpoint {
        RdmaEndpoint {
            lid: 0,
            gid: [7; 16],
            mtu: 3,
            infiniband: false,
            qps: vec![QpEndpoint {
                qp_num: 17,
                psn: 0x123456,
            }],
            regions: vec![(0x1000, 1), (0x2000, 2), (0x3000, 3), (0x4000, 4)],
            notice_ring: (0x9000, 5, 256),
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
}

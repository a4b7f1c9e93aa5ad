//! What the cache regions' registrations are under one rail (none while parked), and the
//! region keys a writer gets after a warm re-attach's swap, with their wire form (the
//! region part of the endpoint, `endpoint.rs`). `rekey.rs` says how they are used.

use super::endpoint::{get_str, put_str, MAX_DEVICE_BYTES, MAX_RAILS, MAX_REGIONS};
use super::tally::{Live, Tally};
use crate::error::{Error, Result};
use crate::layout::RegionTable;
use crate::transport::Resources;
use crate::wire::{DecodeError, Reader};
use kvtransfer_verbs::{Access, MemoryRegion, ProtectionDomain};
use std::sync::Arc;

/// GIDs one rail's keys may name.
const MAX_KEY_GIDS: usize = super::endpoint::MAX_GIDS;

/// The cache regions registered under one rail's device: none while parked.
pub(super) struct RegionMrs {
    pub(super) mrs: Vec<MemoryRegion>,
    /// Their bytes, counted (dropped after them: field order).
    _tally: Option<Tally>,
}

impl RegionMrs {
    /// Registers every region of `table` under `pd`.
    pub(super) fn register(
        pd: &Arc<ProtectionDomain>,
        table: &RegionTable,
        access: Access,
        live: &Arc<Live>,
    ) -> Result<RegionMrs> {
        // Host regions: ibv_reg_mr; GPU regions: dma-buf, else nvidia-peermem (gpu_mr.rs).
        let mrs = super::gpu_mr::register_regions(pd, table, access)?;
        let bytes = mrs.iter().map(|mr| mr.len() as u64).sum();
        let held = Resources {
            registered_bytes: bytes,
            ..Resources::default()
        };
        Ok(RegionMrs {
            mrs,
            _tally: Some(Tally::new(live, held)),
        })
    }

    /// No registration (parked).
    pub(super) fn parked() -> RegionMrs {
        RegionMrs {
            mrs: Vec::new(),
            _tally: None,
        }
    }

    /// Whether the regions are parked (a table always has at least one region).
    pub(super) fn is_parked(&self) -> bool {
        self.mrs.is_empty()
    }

    /// (address, rkey) of every region, or the typed refusal while parked.
    pub(super) fn keys(&self) -> Result<Vec<(u64, u32)>> {
        if self.is_parked() {
            return Err(parked_error("an RDMA connection"));
        }
        Ok(self.mrs.iter().map(|mr| (mr.addr(), mr.rkey())).collect())
    }
}

/// What is refused while the regions are parked.
pub(super) fn parked_error(what: &'static str) -> Error {
    Error::Unsupported {
        what,
        reason: "while this communicator is parked for a warm re-attach: its worker is gone and its regions are not registered; try again once a worker re-attached".into(),
    }
}

/// One rail's region keys after a swap: which rail (its device and GIDs, as a writer
/// knows the pair from the handshake) and (address, rkey) of every region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailKeys {
    pub device: String,
    pub gids: Vec<[u8; 16]>,
    pub regions: Vec<(u64, u32)>,
}

/// Every rail's region keys: what a writer needs to reach the regions again after a swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionKeys {
    pub rails: Vec<RailKeys>,
}

impl RegionKeys {
    /// Its wire form (little endian; every list count-prefixed), as the endpoint's.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(self.rails.len() as u8);
        for rail in &self.rails {
            put_str(&mut out, &rail.device, MAX_DEVICE_BYTES);
            out.push(rail.gids.len() as u8);
            for gid in &rail.gids {
                out.extend_from_slice(gid);
            }
            out.extend_from_slice(&(rail.regions.len() as u32).to_le_bytes());
            for (addr, rkey) in &rail.regions {
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&rkey.to_le_bytes());
            }
        }
        out
    }

    /// Parses region keys; refuses counts out of bounds and trailing bytes.
    pub fn decode(bytes: &[u8]) -> std::result::Result<RegionKeys, DecodeError> {
        let mut r = Reader::new(bytes);
        let count = r.u8("rail count")? as usize;
        if count == 0 || count > MAX_RAILS {
            return Err(DecodeError(format!(
                "rail count {count} outside 1..={MAX_RAILS}"
            )));
        }
        let mut rails = Vec::with_capacity(count);
        for _ in 0..count {
            let device = get_str(&mut r, "device name", MAX_DEVICE_BYTES)?;
            let gid_count = r.u8("gid count")? as usize;
            if gid_count == 0 || gid_count > MAX_KEY_GIDS {
                return Err(DecodeError(format!(
                    "gid count {gid_count} outside 1..={MAX_KEY_GIDS}"
                )));
            }
            let gids = (0..gid_count)
                .map(|_| r.array::<16>("gid"))
                .collect::<std::result::Result<Vec<_>, _>>()?;
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
            rails.push(RailKeys {
                device,
                gids,
                regions,
            });
        }
        r.finish("region keys")?;
        Ok(RegionKeys { rails })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RegionKeys {
        RegionKeys {
            rails: vec![
                RailKeys {
                    device: "rxe0".into(),
                    gids: vec![[1; 16], [2; 16]],
                    regions: vec![(0x1000, 7), (0x2000, 8)],
                },
                RailKeys {
                    device: "rxe1".into(),
                    gids: vec![[3; 16]],
                    regions: vec![(0x1000, 9), (0x2000, 10)],
                },
            ],
        }
    }

    #[test]
    fn keys_round_trip_and_every_truncation_is_refused() {
        let bytes = sample().encode();
        assert_eq!(RegionKeys::decode(&bytes).unwrap(), sample());
        for cut in 0..bytes.len() {
            assert!(RegionKeys::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes;
        long.push(0);
        assert!(RegionKeys::decode(&long).is_err());
    }

    #[test]
    fn keys_without_rails_or_regions_are_refused() {
        let none = RegionKeys { rails: Vec::new() };
        assert!(RegionKeys::decode(&none.encode()).is_err());
        let mut empty = sample();
        empty.rails[1].regions.clear();
        let error = RegionKeys::decode(&empty.encode()).unwrap_err();
        assert!(error.0.contains("0 regions"), "{}", error.0);
    }
}

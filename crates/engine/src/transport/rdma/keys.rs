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

/// One rail pair of a writer's link, as it knows the peer's end from the handshake.
pub(super) struct RailPair<'a> {
    /// The peer's device.
    pub(super) device: &'a str,
    /// The peer's GID this pair writes to.
    pub(super) gid: [u8; 16],
    /// Regions the peer announced.
    pub(super) regions: usize,
}

/// The peer's new keys for each of `pairs`: those of the rail with the pair's device name
/// that lists the GID it writes to. All or nothing: a pair without keys, or keys for another
/// number of regions, is refused (the sentence says which).
pub(super) fn keys_for_pairs<'k, 'p>(
    keys: &'k RegionKeys,
    pairs: impl Iterator<Item = RailPair<'p>>,
) -> std::result::Result<Vec<&'k [(u64, u32)]>, String> {
    pairs
        .map(|pair| {
            let found = keys
                .rails
                .iter()
                .find(|k| k.device == pair.device && k.gids.contains(&pair.gid))
                .ok_or_else(|| {
                    format!(
                        "its new region keys name no rail {} with the GID this side writes to",
                        pair.device
                    )
                })?;
            if found.regions.len() != pair.regions {
                return Err(format!(
                    "its new region keys list {} regions on {}; it announced {} at the handshake",
                    found.regions.len(),
                    pair.device,
                    pair.regions
                ));
            }
            Ok(found.regions.as_slice())
        })
        .collect()
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

    fn pair(device: &str, gid: u8, regions: usize) -> RailPair<'_> {
        RailPair {
            device,
            gid: [gid; 16],
            regions,
        }
    }

    #[test]
    fn each_rail_pair_takes_the_keys_of_its_peer_rail() {
        let keys = sample();
        // Pairs in the other order than the keys; the first rail matched by its second GID.
        let chosen = keys_for_pairs(&keys, [pair("rxe1", 3, 2), pair("rxe0", 2, 2)].into_iter());
        assert_eq!(
            chosen.unwrap(),
            vec![
                &[(0x1000, 9), (0x2000, 10)][..],
                &[(0x1000, 7), (0x2000, 8)][..]
            ]
        );
    }

    #[test]
    fn keys_that_miss_a_rail_pair_or_its_regions_are_refused() {
        let keys = sample();
        let gid = keys_for_pairs(&keys, [pair("rxe0", 1, 2), pair("rxe1", 9, 2)].into_iter());
        assert!(gid.unwrap_err().contains("no rail rxe1"));
        let device = keys_for_pairs(&keys, [pair("mlx5_0", 1, 2)].into_iter());
        assert!(device.unwrap_err().contains("no rail mlx5_0"));
        let count = keys_for_pairs(&keys, [pair("rxe0", 1, 3)].into_iter()).unwrap_err();
        assert!(
            count.contains("2 regions on rxe0; it announced 3"),
            "{count}"
        );
    }
}

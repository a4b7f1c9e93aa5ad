//! Warm re-attach over RDMA: the receiving side's region registrations follow its pages,
//! and its writers learn the new keys.
//!
//! A swap (`Engine::swap_imports`) maps a restarted worker's memory under the regions'
//! addresses. A memory region pins the physical pages it was registered over, so the NIC
//! would keep writing into the old ones: every rail deregisters its region MRs and
//! registers them again over the new pages, which gives new keys (`ibv_rereg_mr` with a
//! translation change is not supported by Soft-RoCE, and on-demand paging is not assumed).
//!
//! A park deregisters them and registers nothing over the anonymous pages. While parked no
//! region is registered: a stray WRITE (one no fence stopped) fails at the writer with a
//! remote access error (its link breaks, typed, and it connects again) rather than landing
//! in the dead worker's pages, the old pages are no longer pinned, and no memory is
//! committed for the parked ones (a registration faults every page in). A connection made
//! while parked is refused typed, and this side's own calls fail typed.
//!
//! The new keys of every rail ([`RegionKeys`], the region part of the endpoint) go to each
//! writer over its fence channel (ts/fences.ts), before its fence is lifted. Its link
//! replaces the keys of each rail pair on the progress thread (`Command::Rekey`), the only
//! thread that reads them, so no chain filled after the answer carries an old key.

use super::keys::{keys_for_pairs, RailKeys, RailPair, RegionKeys, RegionMrs};
use super::state::{RdmaDevice, SenderLink};
use crate::error::{Error, Result};

impl RdmaDevice {
    /// Parks: every rail's region registrations are released, none replaces them.
    pub fn park_regions(&self) {
        for rail in &self.shared.rails {
            *crate::util::write(&rail.region_mrs) = RegionMrs::parked();
        }
    }

    /// Registers every region again on every rail, over the pages mapped now (the old
    /// registrations are released first). A rail whose registration fails stays parked
    /// (the error is the registration's, as at open). The rail's lock is held meanwhile:
    /// only this engine's own writes wait for it (none while parked), not its receiving.
    pub fn register_regions_again(&self) -> Result<()> {
        let shared = &self.shared;
        for rail in &shared.rails {
            let mut mrs = crate::util::write(&rail.region_mrs);
            *mrs = RegionMrs::parked();
            *mrs =
                RegionMrs::register(&rail.pd, &shared.table, shared.region_access, &shared.live)?;
        }
        Ok(())
    }

    /// Every rail's region keys now; `None` while parked.
    pub fn region_keys(&self) -> Option<RegionKeys> {
        let mut rails = Vec::new();
        for rail in &self.shared.rails {
            let regions = crate::util::read(&rail.region_mrs).keys().ok()?;
            rails.push(RailKeys {
                device: rail.name().to_string(),
                gids: rail.gids.iter().map(|g| g.candidate.gid).collect(),
                regions,
            });
        }
        Some(RegionKeys { rails })
    }
}

/// Writing side, on the progress thread: replaces the peer's region keys on every rail
/// pair of `link` with `keys` ([`keys_for_pairs`]: all or nothing). Returns the rail pairs
/// updated.
pub(super) fn apply(link: &mut SenderLink, keys: &RegionKeys) -> Result<usize> {
    if let Some(reason) = &link.broken {
        return Err(Error::PeerDisconnected {
            peer: link.peer.clone(),
            reason: reason.clone(),
        });
    }
    let pairs = link.rails.iter().map(|rail| RailPair {
        device: &rail.remote_device,
        gid: rail.remote_gid,
        regions: rail.remote_regions.len(),
    });
    let chosen: Vec<Vec<(u64, u32)>> = keys_for_pairs(keys, pairs)
        .map_err(|reason| Error::protocol(&link.peer, reason))?
        .into_iter()
        .map(<[(u64, u32)]>::to_vec)
        .collect();
    for (rail, regions) in link.rails.iter_mut().zip(chosen) {
        rail.remote_regions = regions;
    }
    Ok(link.rails.len())
}

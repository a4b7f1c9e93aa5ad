//! Which GID a rail uses to reach a peer's rail, and which rails pair.
//!
//! A rail offers every GID of its port that it could use, most preferred first: RoCE v2
//! before RoCE v1, IPv4-mapped before global IPv6 before link-local IPv6, then by table
//! index; each with the prefix length of its address on its interface (from
//! `getifaddrs`). For a peer's rail, the first local GID whose type and address family
//! match one of the peer's GIDs and whose subnet holds it is chosen; a rail with none is
//! refused for that peer, with the reason. `KVCACHE_RDMA_GID_INDEX` leaves one candidate,
//! which is used even when no peer GID lies in its subnet (the operator forced it).

use super::endpoint::{GidCandidate, RailEndpoint};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A GID of a local port, with its table index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalGid {
    pub(crate) index: u8,
    pub(crate) candidate: GidCandidate,
}

/// The address a GID stands for.
pub(crate) fn gid_address(gid: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*gid);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn link_local(address: IpAddr) -> bool {
    matches!(address, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// `10.77.0.1/24 RoCE v2` (the prefix left out when unknown).
pub(crate) fn describe(candidate: &GidCandidate) -> String {
    let address = gid_address(&candidate.gid);
    let prefix = if candidate.prefix == 0 {
        String::new()
    } else {
        format!("/{}", candidate.prefix)
    };
    let kind = if candidate.v2 { "RoCE v2" } else { "RoCE v1" };
    format!("{address}{prefix} {kind}")
}

/// Preference order of a candidate (lower first).
pub(crate) fn rank(candidate: &GidCandidate) -> u8 {
    let address = gid_address(&candidate.gid);
    let family = match address {
        IpAddr::V4(_) => 0,
        IpAddr::V6(_) if link_local(address) => 2,
        IpAddr::V6(_) => 1,
    };
    u8::from(!candidate.v2) * 3 + family
}

fn masked(address: IpAddr, prefix: u8) -> Option<u128> {
    match address {
        IpAddr::V4(v4) if prefix <= 32 => {
            let bits = u32::from(v4);
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            Some(u128::from(bits & mask))
        }
        IpAddr::V6(v6) if prefix <= 128 => {
            let bits = u128::from(v6);
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            Some(bits & mask)
        }
        _ => None,
    }
}

/// Whether `ours` can reach `theirs`: same GID type and address family, and, where a
/// prefix is known, the same subnet (link-local IPv6 reaches only link-local).
pub(crate) fn reaches(ours: &GidCandidate, theirs: &GidCandidate) -> bool {
    if ours.v2 != theirs.v2 {
        return false;
    }
    let (a, b) = (gid_address(&ours.gid), gid_address(&theirs.gid));
    if a.is_ipv4() != b.is_ipv4() || link_local(a) != link_local(b) {
        return false;
    }
    if link_local(a) {
        return true;
    }
    let prefix = if ours.prefix != 0 {
        ours.prefix
    } else {
        theirs.prefix
    };
    if prefix == 0 {
        return true; // neither side knows its subnet: cannot tell, try it
    }
    masked(a, prefix) == masked(b, prefix)
}

/// The GIDs to use for one pair: (index into `ours`, index into `theirs`), or why none.
pub(crate) fn choose_gids(
    device: &str,
    ours: &[LocalGid],
    forced: bool,
    infiniband: bool,
    peer: &RailEndpoint,
) -> Result<(usize, usize), String> {
    if infiniband != peer.infiniband {
        let layer = |ib| if ib { "InfiniBand" } else { "RoCE" };
        return Err(format!(
            "{device} is {} but the peer's {} is {}",
            layer(infiniband),
            peer.device,
            layer(peer.infiniband)
        ));
    }
    if infiniband {
        return Ok((0, 0));
    }
    for (i, local) in ours.iter().enumerate() {
        for (j, remote) in peer.gids.iter().enumerate() {
            if reaches(&local.candidate, remote) {
                return Ok((i, j));
            }
        }
    }
    if forced {
        // KVCACHE_RDMA_GID_INDEX: the operator's choice stands; pick the peer's GID of the
        // same type and family.
        let local = &ours[0].candidate;
        let same = |r: &GidCandidate| {
            r.v2 == local.v2 && gid_address(&r.gid).is_ipv4() == gid_address(&local.gid).is_ipv4()
        };
        if let Some(j) = peer.gids.iter().position(same) {
            return Ok((0, j));
        }
    }
    let list = |gids: &mut dyn Iterator<Item = &GidCandidate>| {
        gids.map(describe).collect::<Vec<_>>().join(", ")
    };
    Err(format!(
        "no GID of {device} ({}) is of the type, address family and subnet of a GID of the peer's {} ({})",
        list(&mut ours.iter().map(|g| &g.candidate)),
        peer.device,
        list(&mut peer.gids.iter())
    ))
}

/// Why `local` (a GID of `device`) is the one used to reach `theirs` (a GID of the peer's
/// `peer_device`): what `peerInfo` shows per rail.
pub(crate) fn gid_reason(
    device: &str,
    local: &LocalGid,
    forced: bool,
    infiniband: bool,
    peer_device: &str,
    theirs: &GidCandidate,
) -> String {
    let index = local.index;
    if forced {
        return format!("index {index}: forced by KVCACHE_RDMA_GID_INDEX");
    }
    if infiniband {
        return format!("index {index}: InfiniBand routes by LID");
    }
    let ours = &local.candidate;
    let subnet = if ours.prefix == 0 && theirs.prefix == 0 {
        "no subnet known on either side"
    } else {
        "in its subnet"
    };
    format!(
        "index {index} ({}): the first GID of {device} (RoCE v2 before v1, IPv4 before IPv6, link-local last) of the type and family of the peer's {peer_device} GID {}, {subnet}",
        describe(ours),
        describe(theirs)
    )
}

/// A rail pair: (our rail, their rail, our GID index into our list, their GID index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pairing {
    pub(crate) ours: usize,
    pub(crate) theirs: usize,
    pub(crate) our_gid: usize,
    pub(crate) their_gid: usize,
}

/// One local rail as pairing sees it: device name, GIDs, whether forced, InfiniBand.
pub(crate) struct RailGids<'a> {
    pub(crate) device: &'a str,
    pub(crate) gids: &'a [LocalGid],
    pub(crate) forced: bool,
    pub(crate) infiniband: bool,
}

/// Pairs each of the peer's rails, in order, with a free local rail it can reach (the one
/// at the same position first, then the next ones). Returns the pairs and, for each peer
/// rail left out, why.
pub(crate) fn pair_rails(
    ours: &[RailGids<'_>],
    theirs: &[RailEndpoint],
) -> (Vec<Pairing>, Vec<(u8, String)>) {
    let mut used = vec![false; ours.len()];
    let mut pairs = Vec::new();
    let mut refused = Vec::new();
    for (t, peer) in theirs.iter().enumerate() {
        let mut reasons = Vec::new();
        let mut found = None;
        for k in 0..ours.len() {
            let o = (t + k) % ours.len();
            if used[o] {
                continue;
            }
            let rail = &ours[o];
            match choose_gids(rail.device, rail.gids, rail.forced, rail.infiniband, peer) {
                Ok((our_gid, their_gid)) => {
                    found = Some(Pairing {
                        ours: o,
                        theirs: t,
                        our_gid,
                        their_gid,
                    });
                    break;
                }
                Err(reason) => reasons.push(reason),
            }
        }
        match found {
            Some(pair) => {
                used[pair.ours] = true;
                pairs.push(pair);
            }
            None => {
                let why = if reasons.is_empty() {
                    format!(
                        "every rail of the acceptor is paired already ({} rails)",
                        ours.len()
                    )
                } else {
                    reasons.join("; ")
                };
                refused.push((t as u8, why));
            }
        }
    }
    (pairs, refused)
}

/// Prefix lengths of this host's interface addresses (from `getifaddrs`).
pub(crate) fn interface_prefixes() -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the live list returned by getifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family tells its size.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: AF_INET addresses and netmasks are sockaddr_in.
            let (addr, mask) = unsafe {
                (
                    *(entry.ifa_addr as *const libc::sockaddr_in),
                    *(entry.ifa_netmask as *const libc::sockaddr_in),
                )
            };
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            let prefix = u32::from_be(mask.sin_addr.s_addr).count_ones() as u8;
            out.push((IpAddr::V4(ip), prefix));
        } else if family == libc::AF_INET6 {
            // SAFETY: AF_INET6 addresses and netmasks are sockaddr_in6.
            let (addr, mask) = unsafe {
                (
                    *(entry.ifa_addr as *const libc::sockaddr_in6),
                    *(entry.ifa_netmask as *const libc::sockaddr_in6),
                )
            };
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            let prefix = u128::from_be_bytes(mask.sin6_addr.s6_addr).count_ones() as u8;
            out.push((IpAddr::V6(ip), prefix));
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The prefix length of `gid`'s address on this host, 0 when no interface carries it.
pub(crate) fn prefix_of(gid: &[u8; 16], prefixes: &[(IpAddr, u8)]) -> u8 {
    let address = gid_address(gid);
    prefixes
        .iter()
        .find(|(a, _)| *a == address)
        .map_or(0, |(_, p)| *p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4], prefix: u8, v2: bool) -> GidCandidate {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&a);
        GidCandidate { gid, v2, prefix }
    }

    fn rail(device: &str, gids: Vec<GidCandidate>) -> RailEndpoint {
        RailEndpoint {
            device: device.into(),
            peer_rail: 0,
            lid: 0,
            gids,
            mtu: 3,
            infiniband: false,
            speed_mbps: 1,
            qps: Vec::new(),
            regions: Vec::new(),
            notice_ring: (0, 0, 0),
        }
    }

    fn local(gids: &[GidCandidate]) -> Vec<LocalGid> {
        gids.iter()
            .enumerate()
            .map(|(i, c)| LocalGid {
                index: i as u8,
                candidate: *c,
            })
            .collect()
    }

    #[test]
    fn the_gid_in_the_peers_subnet_is_chosen_v2_before_v1() {
        let ours = local(&[
            v4([10, 78, 0, 1], 24, true),
            v4([10, 99, 0, 2], 24, false),
            v4([10, 99, 0, 2], 24, true),
        ]);
        let peer = rail(
            "rxe2",
            vec![v4([10, 99, 0, 1], 24, false), v4([10, 99, 0, 1], 24, true)],
        );
        assert_eq!(choose_gids("rxe1", &ours, false, false, &peer), Ok((1, 0)));
        let mut sorted = ours.clone();
        sorted.sort_by_key(|g| rank(&g.candidate));
        assert_eq!(
            choose_gids("rxe1", &sorted, false, false, &peer),
            Ok((1, 1))
        );
        assert_eq!(sorted[1].index, 2);
    }

    #[test]
    fn a_rail_without_a_reachable_gid_is_refused_with_the_reason() {
        let ours = local(&[v4([10, 78, 0, 1], 24, true)]);
        let peer = rail("rxe2", vec![v4([10, 99, 0, 1], 24, true)]);
        let why = choose_gids("rxe1", &ours, false, false, &peer).unwrap_err();
        assert!(why.contains("10.78.0.1/24 RoCE v2"), "{why}");
        assert!(why.contains("rxe2 (10.99.0.1/24 RoCE v2)"), "{why}");
        // Forced by KVCACHE_RDMA_GID_INDEX: used anyway.
        assert_eq!(choose_gids("rxe1", &ours, true, false, &peer), Ok((0, 0)));
    }

    #[test]
    fn the_reason_names_the_gid_the_peers_gid_and_what_forced_it() {
        let ours = LocalGid {
            index: 3,
            candidate: v4([10, 78, 0, 1], 24, true),
        };
        let theirs = v4([10, 78, 0, 2], 24, true);
        let why = gid_reason("rxe1", &ours, false, false, "rxe3", &theirs);
        assert!(why.starts_with("index 3 (10.78.0.1/24 RoCE v2)"), "{why}");
        assert!(
            why.contains("rxe3 GID 10.78.0.2/24 RoCE v2, in its subnet"),
            "{why}"
        );
        let forced = gid_reason("rxe1", &ours, true, false, "rxe3", &theirs);
        assert_eq!(forced, "index 3: forced by KVCACHE_RDMA_GID_INDEX");
        let unknown = LocalGid {
            index: 1,
            candidate: v4([10, 78, 0, 1], 0, true),
        };
        let why = gid_reason(
            "rxe1",
            &unknown,
            false,
            false,
            "rxe3",
            &v4([10, 78, 0, 2], 0, true),
        );
        assert!(why.ends_with("no subnet known on either side"), "{why}");
    }

    #[test]
    fn rails_pair_by_position_then_by_reach() {
        let a = local(&[v4([10, 77, 0, 1], 24, true)]);
        let b = local(&[v4([10, 78, 0, 1], 24, true)]);
        let ours = [
            RailGids {
                device: "rxe0",
                gids: &a,
                forced: false,
                infiniband: false,
            },
            RailGids {
                device: "rxe1",
                gids: &b,
                forced: false,
                infiniband: false,
            },
        ];
        // The peer lists its rails the other way round: each still finds its subnet.
        let theirs = [
            rail("p1", vec![v4([10, 78, 0, 2], 24, true)]),
            rail("p0", vec![v4([10, 77, 0, 2], 24, true)]),
            rail("p9", vec![v4([10, 90, 0, 2], 24, true)]),
        ];
        let (pairs, refused) = pair_rails(&ours, &theirs);
        assert_eq!(
            pairs.iter().map(|p| (p.ours, p.theirs)).collect::<Vec<_>>(),
            [(1, 0), (0, 1)]
        );
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 2);
        assert!(refused[0].1.contains("paired already"), "{}", refused[0].1);
    }

    #[test]
    fn link_local_and_families_do_not_mix() {
        let mut ll = [0u8; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        ll[15] = 1;
        let ll = GidCandidate {
            gid: ll,
            v2: true,
            prefix: 64,
        };
        assert!(!reaches(&ll, &v4([10, 0, 0, 1], 0, true)));
        assert!(reaches(&ll, &ll));
        assert!(reaches(
            &v4([10, 0, 0, 1], 0, true),
            &v4([192, 168, 0, 1], 0, true)
        ));
        assert!(!reaches(
            &v4([10, 0, 0, 1], 8, true),
            &v4([11, 0, 0, 1], 8, true)
        ));
    }
}

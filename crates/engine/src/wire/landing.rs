//! The landing of a checksummed call: what a receiver that does not see a call's bytes arrive
//! (a one-sided transport: RDMA WRITEs, and GPU copies) needs to find them in its own
//! memory, in the order the writer moved and summed them. It is the receiver's side of the
//! call's shard geometry (`shard::Geometry`: where a segment starts in a block, its length,
//! segments per block, the distance between segments) for K/V blocks and for scale blocks,
//! and the call's runs of destination blocks. The receiver takes its block sizes, region
//! addresses and block count from its own layout and checks every range against them
//! (`transport::checksum::land`).
//!
//! Wire form: kinds u8 (K, V and the scales the writer moves per layer), then for K/V and
//! for the scales four varints (offset, piece, pieces, stride), then the run count (varint)
//! and per run the zigzag varint distance of its first block from the end of the previous
//! run (from 0 for the first) and its block count less one (varint). A list of contiguous
//! blocks is one run: a few bytes whatever its length.

use super::{DecodeError, Reader};
use crate::plan::Run;
use crate::shard::{Geometry, Shard};

/// Kinds a layer has at most: K, V and their two scales.
pub const MAX_LANDING_KINDS: u32 = 4;
/// Bytes of a varint at most (a u64 in 7-bit groups).
const MAX_VARINT_BYTES: usize = 10;
/// Bytes of an encoded run at least (two one-byte varints).
const MIN_RUN_BYTES: usize = 2;

/// Where one kind's segments land in a receiver block: `pieces` segments of `piece` bytes,
/// segment `s` at `offset + s × stride` of the block (the remote side of a `Geometry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reach {
    /// Where the first segment starts in the block.
    pub offset: u64,
    /// Bytes of one segment.
    pub piece: u64,
    /// Segments per block.
    pub pieces: u32,
    /// Bytes between the starts of consecutive segments.
    pub stride: u64,
}

impl Reach {
    /// The receiver's side of `geometry`.
    pub fn of(geometry: &Geometry) -> Reach {
        Reach {
            offset: geometry.remote_offset,
            piece: geometry.piece,
            pieces: geometry.pieces,
            stride: geometry.remote_stride,
        }
    }
}

/// A decoded landing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Landing {
    /// Kinds the writer moves per layer (K, V, then the scales; the receiver's must match).
    pub kinds: u32,
    /// Where K and V segments land in a block.
    pub kv: Reach,
    /// Where scale segments land in a scale block.
    pub scale: Reach,
    /// Runs of destination blocks, in the call's order: (first block, block count ≥ 1).
    pub runs: Vec<(u32, u32)>,
}

impl Landing {
    /// Appends the landing of a call moving `runs` with `shard` (`kinds` kinds per layer) to
    /// `out`. The writer's planner checked the runs; nothing here can fail.
    pub fn encode(shard: &Shard, kinds: u32, runs: &[Run], out: &mut Vec<u8>) {
        let reaches = [Reach::of(&shard.kv), Reach::of(&shard.scale)];
        let runs = runs.iter().map(|run| (run.remote_block, run.blocks));
        put(out, kinds, reaches, runs);
    }

    /// The wire form of a decoded landing (what fuzzing and the decoder tests re-encode).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put(
            &mut out,
            self.kinds,
            [self.kv, self.scale],
            self.runs.iter().copied(),
        );
        out
    }

    /// Parses a landing, refusing truncation, trailing bytes, overlong varints, a kind count
    /// outside 1..=[`MAX_LANDING_KINDS`], values past their field's range and runs past
    /// block 2^32. Allocates at most one run per two input bytes.
    pub fn decode(bytes: &[u8]) -> Result<Landing, DecodeError> {
        let mut r = Reader::new(bytes);
        let kinds = u32::from(r.u8("landing kinds")?);
        if kinds == 0 || kinds > MAX_LANDING_KINDS {
            return Err(DecodeError(format!(
                "landing names {kinds} kinds per layer; it must be in 1..={MAX_LANDING_KINDS}"
            )));
        }
        let mut reach = |what: &str| -> Result<Reach, DecodeError> {
            Ok(Reach {
                offset: varint(&mut r, what)?,
                piece: varint(&mut r, what)?,
                pieces: narrow(varint(&mut r, what)?, what)?,
                stride: varint(&mut r, what)?,
            })
        };
        let kv = reach("landing K/V reach")?;
        let scale = reach("landing scale reach")?;
        let count = varint(&mut r, "landing run count")?;
        let left = (bytes.len() - r.at) / MIN_RUN_BYTES;
        if count > left as u64 {
            return Err(DecodeError(format!(
                "landing announces {count} runs but {} bytes hold at most {left}",
                bytes.len() - r.at
            )));
        }
        let mut runs = Vec::with_capacity(count as usize);
        let mut end = 0i64;
        for _ in 0..count {
            let delta = unzigzag(varint(&mut r, "landing run start")?);
            let blocks = varint(&mut r, "landing run length")?.saturating_add(1);
            // A start or end past i64 is as far outside blocks 0..2^32 as any (no overflow).
            let start = end.checked_add(delta).unwrap_or(-1);
            let last = start.checked_add(i64::try_from(blocks).unwrap_or(i64::MAX));
            match last {
                Some(last) if start >= 0 && last <= 1 << 32 && blocks <= u64::from(u32::MAX) => {
                    runs.push((start as u32, blocks as u32));
                    end = last;
                }
                _ => {
                    return Err(DecodeError(format!(
                    "landing run of {blocks} blocks from block {start} is outside blocks 0..2^32"
                )))
                }
            }
        }
        r.finish("landing")?;
        Ok(Landing {
            kinds,
            kv,
            scale,
            runs,
        })
    }

    /// The reach of kind `kind` when `cache_kinds` of the kinds are K/V (the rest scales).
    pub fn reach(&self, kind: u32, cache_kinds: u32) -> &Reach {
        if kind < cache_kinds {
            &self.kv
        } else {
            &self.scale
        }
    }

    /// Blocks the runs cover.
    pub fn blocks(&self) -> u64 {
        self.runs.iter().map(|&(_, n)| u64::from(n)).sum()
    }
}

fn put(
    out: &mut Vec<u8>,
    kinds: u32,
    reaches: [Reach; 2],
    runs: impl ExactSizeIterator<Item = (u32, u32)>,
) {
    out.push(kinds as u8);
    for reach in reaches {
        put_varint(out, reach.offset);
        put_varint(out, reach.piece);
        put_varint(out, u64::from(reach.pieces));
        put_varint(out, reach.stride);
    }
    put_varint(out, runs.len() as u64);
    let mut end = 0i64;
    for (start, blocks) in runs {
        let start = i64::from(start);
        put_varint(out, zigzag(start - end));
        put_varint(out, u64::from(blocks.saturating_sub(1)));
        end = start + i64::from(blocks);
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint of at most [`MAX_VARINT_BYTES`], refusing one past u64.
fn varint(r: &mut Reader<'_>, what: &str) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for i in 0..MAX_VARINT_BYTES {
        let byte = r.u8(what)?;
        let bits = u64::from(byte & 0x7f);
        let shift = 7 * i as u32;
        if shift == 63 && bits > 1 {
            return Err(DecodeError(format!("{what} overflows 64 bits")));
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError(format!(
        "{what} runs past {MAX_VARINT_BYTES} bytes"
    )))
}

fn narrow(v: u64, what: &str) -> Result<u32, DecodeError> {
    u32::try_from(v).map_err(|_| DecodeError(format!("{what}: {v} segments is past 2^32")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::CacheLayout;

    fn run(local_block: u32, remote_block: u32, blocks: u32) -> Run {
        Run {
            local_block,
            remote_block,
            blocks,
        }
    }

    fn encoded(shard: &Shard, kinds: u32, runs: &[Run]) -> Vec<u8> {
        let mut out = Vec::new();
        Landing::encode(shard, kinds, runs, &mut out);
        out
    }

    #[test]
    fn a_scattered_list_of_1538_blocks_takes_under_4700_bytes() {
        // What `rdma::notice::MAX_LANDING_BYTES` is sized for: a prepared list of 1538
        // scattered ids (a permutation, so almost every block is its own run).
        let layout = CacheLayout::new(1, true, 1538, 65_536).unwrap();
        let shard = Shard::whole(&layout);
        let mut ids: Vec<u32> = (0..1538).collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for i in (1..ids.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ids.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let runs: Vec<Run> = ids.iter().map(|&id| run(id, id, 1)).collect();
        let bytes = encoded(&shard, 4, &runs);
        assert!(bytes.len() < 4700, "{} bytes", bytes.len());
        assert_eq!(Landing::decode(&bytes).unwrap().runs.len(), 1538);
    }

    #[test]
    fn landings_round_trip_and_a_contiguous_list_is_a_few_bytes() {
        let layout = CacheLayout::new(1, true, 1 << 20, 65_536).unwrap();
        let shard = Shard::whole(&layout);
        let one = encoded(&shard, 2, &[run(0, 0, 100_000)]);
        // kinds, 8 reach varints (64 KiB pieces and strides take 3 bytes), count, one run.
        assert!(
            one.len() <= 1 + 2 * (1 + 3 + 1 + 3) + 1 + 1 + 3,
            "{}",
            one.len()
        );
        let decoded = Landing::decode(&one).unwrap();
        assert_eq!(decoded.runs, [(0, 100_000)]);
        assert_eq!(decoded.kv, Reach::of(&shard.kv));
        // Scattered, backwards and far: every run comes back.
        let runs = [
            run(0, 70, 2),
            run(5, 3, 1),
            run(9, u32::MAX - 1, 2),
            run(1, 0, 1),
        ];
        let decoded = Landing::decode(&encoded(&shard, 4, &runs)).unwrap();
        let back: Vec<(u32, u32)> = runs.iter().map(|r| (r.remote_block, r.blocks)).collect();
        assert_eq!(decoded.runs, back);
        assert_eq!((decoded.kinds, decoded.blocks()), (4, 6));
        assert_eq!(decoded.to_bytes(), encoded(&shard, 4, &runs));
        let empty = Landing::decode(&encoded(&shard, 1, &[])).unwrap();
        assert!(empty.runs.is_empty());
    }

    #[test]
    fn bad_landings_are_refused() {
        let layout = CacheLayout::new(1, true, 8, 64).unwrap();
        let good = encoded(&Shard::whole(&layout), 2, &[run(0, 3, 2), run(0, 7, 1)]);
        for cut in 0..good.len() {
            assert!(Landing::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Landing::decode(&trailing).is_err());
        for kinds in [0u8, 5, 255] {
            let mut bad = good.clone();
            bad[0] = kinds;
            let err = Landing::decode(&bad).unwrap_err().0;
            assert!(err.contains(&format!("{kinds} kinds")), "{err}");
        }
        // An overlong varint, and one past 64 bits.
        let mut long = vec![2u8];
        long.extend([0x80; 11]);
        assert!(Landing::decode(&long)
            .unwrap_err()
            .0
            .contains("past 10 bytes"));
        let mut wide = vec![2u8];
        wide.extend([0xff; 9]);
        wide.push(0x02);
        assert!(Landing::decode(&wide).unwrap_err().0.contains("overflows"));
        // A run count the bytes cannot hold (no allocation of it).
        let mut many = vec![1u8];
        many.extend([0; 8]);
        put_varint(&mut many, u64::MAX);
        assert!(Landing::decode(&many).unwrap_err().0.contains("at most 0"));
        // Runs before block 0 or past 2^32.
        for (start, len) in [(-1i64, 0u64), (i64::from(u32::MAX), 1)] {
            let mut past = vec![1u8];
            past.extend([0; 8]);
            put_varint(&mut past, 1);
            put_varint(&mut past, zigzag(start));
            put_varint(&mut past, len);
            let err = Landing::decode(&past).unwrap_err().0;
            assert!(err.contains("outside blocks"), "{err}");
        }
    }

    #[test]
    fn zigzag_round_trips_the_extremes() {
        for v in [
            0i64,
            1,
            -1,
            i64::from(u32::MAX),
            -i64::from(u32::MAX),
            i64::MIN,
            i64::MAX,
        ] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    /// Inputs fuzzing found (`fuzz/fuzz_targets/notice.rs`): each is refused or re-encodes
    /// to itself, and none panics.
    #[test]
    fn run_starts_past_i64_and_runs_of_2_pow_32_blocks_are_refused() {
        // A run start delta that overflows i64 from the previous run's end.
        let overflow: &[u8] = &[
            0x03, 0x9c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x03, 0xee, 0x01, 0x03, 0x00,
            0xfe, 0x53, 0x9c, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0xb9, 0x02,
            0x02, 0x02, 0x02, 0xae, 0x02, 0x02, 0x02, 0x02, 0xae, 0x23, 0x04, 0x09,
        ];
        assert!(Landing::decode(overflow).is_err());
        // One run of 2^32 blocks from block 0 (length varint 2^32 - 1): it would not fit u32.
        let mut whole = vec![1u8];
        whole.extend_from_slice(&[0; 8]); // both reaches: zeros
        whole.push(1); // one run
        whole.push(0); // start delta 0
        whole.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // length - 1 = 2^32 - 1
        let err = Landing::decode(&whole).unwrap_err();
        assert!(err.0.contains("outside blocks"), "{}", err.0);
        for data in [overflow, &whole[..]] {
            if let Ok(landing) = Landing::decode(data) {
                assert_eq!(Landing::decode(&landing.to_bytes()).unwrap(), landing);
            }
        }
    }
}

//! The messages of the NVLink side channel after the memory table: the writer sends a
//! tagged call's arrival notice once its bytes landed, or, for a call that asks for an
//! answer (`delivery: 'acked'`), its sequence number and its notice if it has one; the
//! acceptor answers such a call once it took it. A checksummed call's notice comes with
//! its landing (`wire::Landing`: where its bytes are in the acceptor's memory, which the
//! acceptor sums before it reports the arrival). Each is one `socket` message whose first
//! byte says which it is.
//!
//! A warm re-attach of the acceptor (its worker restarted, `Transport::follow_pages`) adds
//! two messages from the acceptor: `Release` when it parks (the writer drops its mappings
//! of the old memory), and `Table` when it swapped in new memory (the new memory table,
//! numbered; its descriptors follow in `Fds` messages, as `SCM_RIGHTS`, like the first
//! table's), which the writer opens before its fence is lifted.

/// Longest landing a message carries (a checksummed call of more runs is refused, typed,
/// before anything is sent: `ReceiverChecks::landing_limit`).
pub(crate) const MAX_LANDING_BYTES: usize = 1 << 20;

const NOTICE: u8 = 1;
const ACKED: u8 = 2;
const ANSWER: u8 = 3;
const RELEASE: u8 = 4;
const TABLE: u8 = 5;
const FDS: u8 = 6;

/// One side-channel message (borrowing the notice and landing bytes it carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Message<'a> {
    /// A tagged call's encoded arrival notice (`wire::Notice`) and its encoded landing
    /// (`wire::Landing`; empty unless the call is checksummed).
    Notice { notice: &'a [u8], landing: &'a [u8] },
    /// A call that waits for the acceptor's answer: its sequence number on this link, its
    /// notice (none for an untagged call) and landing (empty unless checksummed).
    Acked {
        seq: u64,
        notice: Option<&'a [u8]>,
        landing: &'a [u8],
    },
    /// The acceptor took call `seq` (and handed its notice to its arrival sink).
    Answer { seq: u64 },
    /// The acceptor parked its memory (warm re-attach): the writer drops its mappings of
    /// it, and writes fail until a `Table` came.
    Release,
    /// The acceptor's new memory after a warm re-attach: its encoded `MemoryTable`, the
    /// `generation`-th since the transport opened (what `Transport::region_keys` names).
    Table { generation: u64, table: &'a [u8] },
    /// `count` descriptors of the last `Table` ride with this message.
    Fds { count: u32 },
}

impl Message<'_> {
    /// Wire form: the kind byte, then NOTICE: notice length u16, notice, landing (the rest);
    /// ACKED: seq u64, notice length u16 (0: none), notice, landing; ANSWER: seq u64;
    /// RELEASE: nothing; TABLE: generation u64, table (the rest); FDS: count u32.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let with = |head: &[u8], notice: &[u8], landing: &[u8]| {
            let len = u16::try_from(notice.len()).expect("a notice is at most 275 bytes");
            [head, &len.to_le_bytes(), notice, landing].concat()
        };
        match *self {
            Message::Notice { notice, landing } => with(&[NOTICE], notice, landing),
            Message::Acked {
                seq,
                notice,
                landing,
            } => with(
                &[&[ACKED][..], &seq.to_le_bytes()].concat(),
                notice.unwrap_or(&[]),
                landing,
            ),
            Message::Answer { seq } => [&[ANSWER][..], &seq.to_le_bytes()].concat(),
            Message::Release => vec![RELEASE],
            Message::Table { generation, table } => {
                [&[TABLE][..], &generation.to_le_bytes(), table].concat()
            }
            Message::Fds { count } => [&[FDS][..], &count.to_le_bytes()].concat(),
        }
    }

    /// `None` for an unknown kind or a truncated message (the caller closes the channel).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Message<'_>> {
        let (&kind, rest) = bytes.split_first()?;
        let seq =
            |at: &[u8]| -> Option<u64> { Some(u64::from_le_bytes(at.get(..8)?.try_into().ok()?)) };
        match kind {
            NOTICE => {
                let (notice, landing) = split(rest)?;
                Some(Message::Notice { notice, landing })
            }
            ACKED => {
                let (notice, landing) = split(rest.get(8..)?)?;
                Some(Message::Acked {
                    seq: seq(rest)?,
                    notice: Some(notice).filter(|n| !n.is_empty()),
                    landing,
                })
            }
            ANSWER if rest.len() == 8 => Some(Message::Answer { seq: seq(rest)? }),
            RELEASE if rest.is_empty() => Some(Message::Release),
            TABLE => Some(Message::Table {
                generation: seq(rest)?,
                table: rest.get(8..)?,
            }),
            FDS if rest.len() == 4 => Some(Message::Fds {
                count: u32::from_le_bytes(rest.try_into().ok()?),
            }),
            _ => None,
        }
    }
}

/// A notice (u16 length, then its bytes) and the landing after it, from `at`.
fn split(at: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_le_bytes(at.get(..2)?.try_into().ok()?));
    let body = at.get(2..)?;
    (body.len() >= len).then(|| body.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::Message;

    #[test]
    fn every_message_round_trips_and_bad_ones_are_refused() {
        let notice = [9u8; 30];
        let landing = [7u8; 12];
        for message in [
            Message::Notice {
                notice: &notice,
                landing: &[],
            },
            Message::Notice {
                notice: &notice,
                landing: &landing,
            },
            Message::Acked {
                seq: 7,
                notice: Some(&notice),
                landing: &landing,
            },
            Message::Acked {
                seq: 8,
                notice: Some(&notice),
                landing: &[],
            },
            Message::Acked {
                seq: u64::MAX,
                notice: None,
                landing: &[],
            },
            Message::Answer { seq: 42 },
            Message::Release,
            Message::Table {
                generation: 3,
                table: &landing,
            },
            Message::Table {
                generation: 1,
                table: &[],
            },
            Message::Fds { count: 17 },
        ] {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
        assert_eq!(Message::decode(&[]), None);
        assert_eq!(Message::decode(&[0, 1, 2]), None);
        assert_eq!(Message::decode(&[2, 1, 2, 3]), None, "truncated sequence");
        assert_eq!(
            Message::decode(&[2, 1, 2, 3, 4, 5, 6, 7, 8, 1]),
            None,
            "truncated length"
        );
        assert_eq!(
            Message::decode(&[1, 5, 0, 1, 2]),
            None,
            "notice past the end"
        );
        assert_eq!(Message::decode(&[3; 10]), None, "trailing bytes");
        assert_eq!(Message::decode(&[4, 0]), None, "a release with a body");
        assert_eq!(Message::decode(&[5, 1, 2, 3]), None, "truncated generation");
        assert_eq!(Message::decode(&[6, 1, 0, 0]), None, "truncated count");
        assert_eq!(Message::decode(&[6, 1, 0, 0, 0, 0]), None, "trailing bytes");
    }
}

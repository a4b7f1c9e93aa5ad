//! The messages of the NVLink side channel after the memory table: the writer sends a
//! tagged call's arrival notice once its bytes landed, or, for a call that asks for an
//! answer (`delivery: 'acked'`), its sequence number and its notice if it has one; the
//! acceptor answers such a call once it took it. Each is one `socket` message whose first
//! byte says which it is.

const NOTICE: u8 = 1;
const ACKED: u8 = 2;
const ANSWER: u8 = 3;

/// One side-channel message (borrowing the notice bytes it carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Message<'a> {
    /// A tagged call's encoded arrival notice (`wire::Notice`).
    Notice(&'a [u8]),
    /// A call that waits for the acceptor's answer: its sequence number on this link and
    /// its notice (none for an untagged call).
    Acked { seq: u64, notice: Option<&'a [u8]> },
    /// The acceptor took call `seq` (and handed its notice to its arrival sink).
    Answer { seq: u64 },
}

impl Message<'_> {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match *self {
            Message::Notice(notice) => [&[NOTICE][..], notice].concat(),
            Message::Acked { seq, notice } => {
                [&[ACKED][..], &seq.to_le_bytes(), notice.unwrap_or(&[])].concat()
            }
            Message::Answer { seq } => [&[ANSWER][..], &seq.to_le_bytes()].concat(),
        }
    }

    /// `None` for an unknown kind or a truncated message (the caller closes the channel).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Message<'_>> {
        let (&kind, rest) = bytes.split_first()?;
        let seq = || -> Option<u64> { Some(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)) };
        match kind {
            NOTICE => Some(Message::Notice(rest)),
            ACKED => Some(Message::Acked {
                seq: seq()?,
                notice: Some(&rest[8..]).filter(|n| !n.is_empty()),
            }),
            ANSWER if rest.len() == 8 => Some(Message::Answer { seq: seq()? }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Message;

    #[test]
    fn every_message_round_trips_and_bad_ones_are_refused() {
        let notice = [9u8; 30];
        for message in [
            Message::Notice(&notice),
            Message::Acked {
                seq: 7,
                notice: Some(&notice),
            },
            Message::Acked {
                seq: u64::MAX,
                notice: None,
            },
            Message::Answer { seq: 42 },
        ] {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
        assert_eq!(Message::decode(&[]), None);
        assert_eq!(Message::decode(&[0, 1, 2]), None);
        assert_eq!(Message::decode(&[2, 1, 2, 3]), None, "truncated sequence");
        assert_eq!(Message::decode(&[3; 10]), None, "trailing bytes");
    }
}

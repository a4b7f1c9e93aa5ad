//! A side's `name` (a writer's becomes the receiver's metric label, the `peer` of its
//! arrivals and a part of its log lines) is at most 255 bytes of visible ASCII without quotes
//! or backslash: refused at construction and in `set_name` (`ERR_INVALID_ARGUMENT`), and in
//! a peer's handshake, either way (`ERR_PROTOCOL`); every message shows the value escaped.

use kvtransfer_engine::internals::{Descriptor, Envelope};
use kvtransfer_engine::{Role, NAME_RULE};

mod common;
use common::{hello, Side, SideSpec};

fn named(role: Role, name: &str) -> kvtransfer_engine::Result<Side> {
    SideSpec {
        name: Some(name.into()),
        ..SideSpec::new(role, 1, 8, 256)
    }
    .try_build()
}

/// Names outside the rule, and how each error shows its value.
const BAD: &[(&str, &str)] = &[
    ("has space", "'has space'"),
    ("say\"hi\"", "'say\\\"hi\\\"'"),
    ("it's", "'it\\'s'"),
    ("back\\slash", "'back\\\\slash'"),
    ("line\nforged", "'line\\nforged'"),
    ("\u{1b}[2Jclear", "'\\u{1b}[2Jclear'"),
    ("caf\u{e9}", "'caf\u{e9}'"),
];

/// The message is one line of no control characters that names `shown` and the rule.
fn assert_names(err: &kvtransfer_engine::Error, code: &str, shown: &str) {
    let text = err.to_string();
    assert_eq!(err.code(), code, "{text}");
    assert!(text.contains(shown), "{text} does not show {shown}");
    assert!(text.contains(NAME_RULE), "{text} does not state the rule");
    assert!(!text.chars().any(char::is_control), "{text:?}");
}

#[test]
fn a_name_outside_the_rule_is_refused_at_construction_and_in_set_name() {
    for (bad, shown) in BAD {
        let err = named(Role::Prefill, bad).err().expect(bad);
        assert_names(&err, "ERR_INVALID_ARGUMENT", shown);
        assert!(err.to_string().starts_with("invalid name: "), "{err}");
    }
    let long = named(Role::Prefill, &"n".repeat(256)).err().unwrap();
    assert_eq!(long.code(), "ERR_INVALID_ARGUMENT");
    assert!(
        long.to_string().contains("256 bytes given; at most 255"),
        "{long}"
    );
    let fine = "n".repeat(255);
    assert_eq!(named(Role::Prefill, &fine).unwrap().engine.name(), fine);
    let punctuation = "prefill-0.rack_7:5000/a@b[1]{x}=y;z~!#$%&()*+,<>?^`|";
    assert_eq!(
        named(Role::Prefill, punctuation).unwrap().engine.name(),
        punctuation
    );
    // set_name (the default hostname:port, set once the control port is bound): one rule.
    let side = named(Role::Prefill, "").unwrap();
    for (bad, shown) in BAD {
        assert_names(
            &side.engine.set_name(bad).unwrap_err(),
            "ERR_INVALID_ARGUMENT",
            shown,
        );
    }
    side.engine.set_name("host-a:5555").unwrap();
}

/// `envelope` with its descriptor's name replaced (no auth token: no MAC to redo).
fn renamed(envelope: &[u8], name: &str) -> Vec<u8> {
    let mut envelope = Envelope::decode(envelope).unwrap();
    let mut descriptor = Descriptor::decode(&envelope.descriptor).unwrap();
    descriptor.name = name.into();
    envelope.descriptor = descriptor.encode();
    envelope.encode()
}

#[test]
fn a_peer_name_outside_the_rule_is_a_protocol_error_either_way() {
    let prefill = named(Role::Prefill, "prefill-0").unwrap();
    let decode = named(Role::Decode, "decode-0").unwrap();
    for (bad, shown) in BAD {
        // The writer's hello: the receiver refuses it (its name would become a label).
        let forged = renamed(&hello(&prefill, &decode, "decode:1").unwrap(), bad);
        let err = decode.engine.accept(&forged).unwrap_err();
        assert_names(&err, "ERR_PROTOCOL", &format!("peer name {shown}"));
        // The receiver's reply: the writer refuses it.
        let hello = hello(&prefill, &decode, "decode:1").unwrap();
        let reply = renamed(&decode.engine.accept(&hello).unwrap(), bad);
        let err = prefill
            .engine
            .finish_connect("decode:1", "127.0.0.1", &reply)
            .unwrap_err();
        assert_names(&err, "ERR_PROTOCOL", &format!("peer name {shown}"));
        assert!(!prefill.engine.is_connected("decode:1"));
    }
    // The unforged handshake still connects.
    common::connect(&prefill, &decode, "decode:1");
    assert!(prefill.engine.is_connected("decode:1"));
}

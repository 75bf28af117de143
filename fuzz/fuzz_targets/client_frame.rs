//! `common::ClientFrame::parse` on arbitrary bytes.
//!
//! Input: `[max_body/4] [frame...]`. Checked: no panic; an accepted `send` body is within
//! `max_body`; an accepted frame serialized with serde_json parses back to itself (through
//! `parse` and through the derived `Deserialize`); an error's `cid` and `room` are the
//! frame's own `cid` and `room` strings; a frame that is not JSON is `bad_json` with nothing
//! echoed.

#![no_main]

use common::{ClientFrame, ErrorCode};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The top-level fields an error may echo, read independently of `parse`'s own reading.
/// serde's derive skips unknown fields the same way `parse` does (without validating them
/// as fully as `Value` would), so whenever `parse` got that far this reads too.
#[derive(serde::Deserialize)]
struct Echoed {
    #[serde(default)]
    cid: Option<Value>,
    #[serde(default)]
    room: Option<Value>,
}

fn echoed_from_input(input: &[u8], what: &str, got: &str, field: fn(&Echoed) -> &Option<Value>) {
    let probe: Echoed = serde_json::from_slice(input)
        .unwrap_or_else(|e| panic!("{what} {got:?} echoed from a frame that does not read: {e}"));
    assert_eq!(
        field(&probe),
        &Some(Value::String(got.to_owned())),
        "{what} echoed is not the frame's {what}"
    );
    // Where the frame is also plain, strict JSON, the field is there as well.
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(input) {
        assert_eq!(map.get(what), Some(&Value::String(got.to_owned())));
    }
}

fuzz_target!(|input: &[u8]| {
    let [max4, frame @ ..] = input else {
        return;
    };
    let max_body = usize::from(*max4) * 4;
    match ClientFrame::parse(frame, max_body) {
        Ok(parsed) => {
            if let ClientFrame::Send { body, .. } = &parsed {
                assert!(body.len() <= max_body, "body past max_body accepted");
            }
            let json = serde_json::to_vec(&parsed).expect("a frame serializes");
            assert_eq!(
                ClientFrame::parse(&json, max_body).as_ref(),
                Ok(&parsed),
                "re-serialized frame {} parses differently",
                String::from_utf8_lossy(&json)
            );
            let derived: ClientFrame =
                serde_json::from_slice(&json).expect("derived Deserialize reads it");
            assert_eq!(derived, parsed);
        }
        Err(e) => {
            if serde_json::from_slice::<serde::de::IgnoredAny>(frame).is_err() {
                assert_eq!(e.code, ErrorCode::BadJson, "non-JSON frame got {:?}", e.code);
                assert_eq!((&e.cid, &e.room), (&None, &None), "echoed from non-JSON");
            }
            if let Some(cid) = &e.cid {
                echoed_from_input(frame, "cid", cid, |p| &p.cid);
            }
            if let Some(room) = &e.room {
                echoed_from_input(frame, "room", room, |p| &p.room);
            }
            assert!(!e.message.is_empty(), "an error without a message");
        }
    }
});

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

/// A top-level field an error may echo, read alone (every other field skipped unread) and
/// independently of `parse`'s own reading.
#[derive(serde::Deserialize)]
struct CidProbe {
    #[serde(default)]
    cid: Field,
}

#[derive(serde::Deserialize)]
struct RoomProbe {
    #[serde(default)]
    room: Field,
}

/// A field's value if it is a string. Anything else is skipped unread, as `IgnoredAny` does:
/// a `Value` would refuse JSON that `parse` may legally skip, such as `1e999` in an array.
#[derive(Debug, Default, PartialEq)]
enum Field {
    #[default]
    NotString,
    Str(String),
}

impl<'de> serde::Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<Field, E> {
                Ok(Field::Str(v.to_owned()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Field, E> {
                Ok(Field::NotString)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Field, E> {
                Ok(Field::NotString)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Field, E> {
                Ok(Field::NotString)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Field, E> {
                Ok(Field::NotString)
            }
            fn visit_unit<E>(self) -> Result<Field, E> {
                Ok(Field::NotString)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Field, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Field::NotString)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Field, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::NotString)
            }
        }
        d.deserialize_any(V)
    }
}

fn echoed_from_input(input: &[u8], what: &str, got: &str, probe: Result<Field, serde_json::Error>) {
    let probe = probe
        .unwrap_or_else(|e| panic!("{what} {got:?} echoed from a frame that does not read: {e}"));
    assert_eq!(
        &probe,
        &Field::Str(got.to_owned()),
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
                assert_eq!(
                    e.code,
                    ErrorCode::BadJson,
                    "non-JSON frame got {:?}",
                    e.code
                );
                assert_eq!((&e.cid, &e.room), (&None, &None), "echoed from non-JSON");
            }
            if let Some(cid) = &e.cid {
                echoed_from_input(
                    frame,
                    "cid",
                    cid,
                    serde_json::from_slice::<CidProbe>(frame).map(|p| p.cid),
                );
            }
            if let Some(room) = &e.room {
                echoed_from_input(
                    frame,
                    "room",
                    room,
                    serde_json::from_slice::<RoomProbe>(frame).map(|p| p.room),
                );
            }
            assert!(!e.message.is_empty(), "an error without a message");
        }
    }
});

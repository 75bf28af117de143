//! Validated identifiers: room ids, user ids and client message ids.
//!
//! Each is a newtype that can only be built through validation, so code holding a `RoomId`
//! never re-checks it. The character set is the same for all three: ASCII letters, digits and
//! `_ - . :` (safe in URLs, CQL text, Redis keys and log lines without escaping).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} may only contain ASCII letters, digits and '_', '-', '.', ':'")]
    BadChar { kind: &'static str },
}

fn validate(kind: &'static str, max: usize, s: &str) -> Result<(), InvalidName> {
    if s.is_empty() {
        return Err(InvalidName::Empty { kind });
    }
    if s.len() > max {
        return Err(InvalidName::TooLong { kind, max });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err(InvalidName::BadChar { kind });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            pub fn new(s: impl Into<String>) -> Result<Self, InvalidName> {
                let s = s.into();
                validate($kind, Self::MAX_LEN, &s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A room id: 1 to 128 bytes of `[A-Za-z0-9_.:-]`.
    RoomId,
    "room id",
    128
);
name_type!(
    /// A user id (a JWT `sub`): 1 to 128 bytes of `[A-Za-z0-9_.:-]`.
    UserId,
    "user id",
    128
);
name_type!(
    /// A client message id, chosen by the sender and reused on retries: 1 to 64 bytes.
    ClientMsgId,
    "cid",
    64
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_charset() {
        assert!(RoomId::new("team-42.general:eu_1").is_ok());
        assert!(UserId::new("a").is_ok());
        assert!(ClientMsgId::new("x".repeat(64)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_odd_characters() {
        assert_eq!(RoomId::new(""), Err(InvalidName::Empty { kind: "room id" }));
        assert!(matches!(
            RoomId::new("r".repeat(129)),
            Err(InvalidName::TooLong { .. })
        ));
        for bad in ["a b", "a/b", "é", "a\0", "room?x=1", "{}"] {
            assert!(
                matches!(RoomId::new(bad), Err(InvalidName::BadChar { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(ClientMsgId::new("c".repeat(65)).is_err());
    }

    #[test]
    fn deserializing_validates() {
        let ok: RoomId = serde_json::from_str("\"lobby\"").expect("valid");
        assert_eq!(ok.as_str(), "lobby");
        assert!(serde_json::from_str::<RoomId>("\"no spaces\"").is_err());
    }
}

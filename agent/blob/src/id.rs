//! The two 32-byte blake3 names a blob has, as distinct types so they cannot
//! be mixed up: [`BlobId`] (what peers fetch by) and [`ContentHash`] (what
//! `b3sum` prints for the file, and what users see).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Why a hex string is not a valid 32-byte hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseHashError {
    /// Not 64 characters long.
    #[error("invalid {what} {input:?}: expected 64 hex characters, got {len}")]
    Length {
        /// Which kind of hash was being parsed ("blob id" or "content hash").
        what: &'static str,
        /// The input, cut to 80 characters.
        input: String,
        /// Its length in characters.
        len: usize,
    },
    /// Contains a character that is not a hex digit.
    #[error("invalid {what} {input:?}: {found:?} at position {pos} is not a hex digit")]
    NotHex {
        /// Which kind of hash was being parsed.
        what: &'static str,
        /// The input.
        input: String,
        /// The offending character.
        found: char,
        /// Its position (in characters).
        pos: usize,
    },
}

fn parse_hex32(what: &'static str, s: &str) -> Result<[u8; 32], ParseHashError> {
    let len = s.chars().count();
    if len != 64 {
        return Err(ParseHashError::Length {
            what,
            input: s.chars().take(80).collect(),
            len,
        });
    }
    let mut out = [0u8; 32];
    // Length in chars is 64; a non-ASCII char would make byte indexing wrong,
    // so walk chars and report the first non-hex one by its char position.
    let mut nibbles = s.chars().enumerate().map(|(pos, c)| {
        c.to_digit(16)
            .map(|d| d as u8)
            .ok_or(ParseHashError::NotHex {
                what,
                input: s.to_owned(),
                found: c,
                pos,
            })
    });
    for byte in out.iter_mut() {
        let hi = nibbles.next().unwrap_or(Ok(0))?;
        let lo = nibbles.next().unwrap_or(Ok(0))?;
        *byte = (hi << 4) | lo;
    }
    Ok(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8; 32]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

macro_rules! hash_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw hash bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                $name(bytes)
            }

            /// The raw hash bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lowercase hex, 64 characters.
            pub fn to_hex(&self) -> String {
                self.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "("))?;
                write_hex(f, &self.0)?;
                write!(f, ")")
            }
        }

        impl FromStr for $name {
            type Err = ParseHashError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32($what, s).map($name)
            }
        }

        // On the wire a hash is a 32-byte CBOR byte string, not an array of
        // 32 integers (which serde would make of `[u8; 32]`).
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_bytes(Bytes32Visitor($what)).map($name)
            }
        }
    };
}

hash_type!(
    /// A blob's address: blake3 of its CBOR-encoded [`Manifest`](crate::Manifest).
    ///
    /// This is what peers advertise and fetch by. It is *not* the hash of the
    /// file's bytes; that is [`ContentHash`].
    BlobId,
    "blob id"
);

hash_type!(
    /// blake3 of a blob's whole content, exactly what `b3sum FILE` prints.
    ///
    /// This is the hash users see (e.g. `shoal plugin ls`); it is recorded in
    /// the manifest and checked when a download finishes.
    ContentHash,
    "content hash"
);

struct Bytes32Visitor(&'static str);

impl<'de> Visitor<'de> for Bytes32Visitor {
    type Value = [u8; 32];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a 32-byte {}", self.0)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        v.try_into()
            .map_err(|_| E::custom(format_args!("{} must be 32 bytes, got {}", self.0, v.len())))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Accept the array-of-integers form too, for formats without byte strings.
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = seq
                .next_element()?
                .ok_or_else(|| de::Error::invalid_length(i, &self))?;
        }
        if seq.next_element::<u8>()?.is_some() {
            return Err(de::Error::invalid_length(33, &self));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = BlobId::from_bytes(*blake3::hash(b"x").as_bytes());
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, blake3::hash(b"x").to_hex().as_str());
        assert_eq!(s.parse::<BlobId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<BlobId>().unwrap(), id);
    }

    #[test]
    fn garbage_id_strings_give_clear_errors() {
        let e = "abc".parse::<BlobId>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"invalid blob id "abc": expected 64 hex characters, got 3"#
        );
        let bad = format!("{}g", "0".repeat(63));
        let e = bad.parse::<ContentHash>().unwrap_err();
        assert!(
            e.to_string().contains("content hash") && e.to_string().contains("'g' at position 63"),
            "{e}"
        );
        // Multi-byte characters must not panic on byte slicing.
        let e = "é".repeat(64).parse::<BlobId>().unwrap_err();
        assert!(matches!(e, ParseHashError::NotHex { pos: 0, .. }), "{e:?}");
        let e = "é".repeat(32).parse::<BlobId>().unwrap_err();
        assert!(matches!(e, ParseHashError::Length { len: 32, .. }), "{e:?}");
        assert!("".parse::<BlobId>().is_err());
    }
}

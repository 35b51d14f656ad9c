//! Request bodies: what `POST` routes of the API accept as JSON, and the checks
//! that need nothing but the body itself. Checks that need the cluster (does the
//! service exist, is the count within the limit for this service) stay with the
//! agent loop.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest JSON body accepted; every body here is a few dozen bytes.
pub const MAX_BODY_BYTES: usize = 64 << 10;

/// Why a request body was refused (the API answers `400` with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// No bytes at all.
    Empty {
        /// What the route expected, e.g. `{"replicas": N}`.
        expected: &'static str,
    },
    /// Over [`MAX_BODY_BYTES`].
    TooLarge(usize),
    /// Not JSON of the expected shape (serde's message, with line and column).
    Shape {
        /// What the route expected.
        expected: &'static str,
        /// What was wrong.
        why: String,
    },
    /// Well-formed, but a value is not acceptable.
    Invalid(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Empty { expected } => {
                write!(
                    f,
                    "the request body is empty; expected JSON like {expected}"
                )
            }
            BodyError::TooLarge(n) => write!(
                f,
                "the request body is {n} bytes; the limit is {MAX_BODY_BYTES}"
            ),
            BodyError::Shape { expected, why } => {
                write!(f, "request body: {why} (expected JSON like {expected})")
            }
            BodyError::Invalid(why) => write!(f, "request body: {why}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// A JSON request body: its shape and the checks it needs on its own.
pub trait RequestBody: DeserializeOwned + Serialize {
    /// An example of the expected JSON, for error messages.
    const EXPECTED: &'static str;

    /// Checks values serde cannot (names, references); the default accepts all.
    fn check(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// Decodes and checks one request body, as every JSON route of the API does.
pub fn decode<T: RequestBody>(bytes: &[u8]) -> Result<T, BodyError> {
    if bytes.len() > MAX_BODY_BYTES {
        return Err(BodyError::TooLarge(bytes.len()));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty {
            expected: T::EXPECTED,
        });
    }
    let mut body: T = serde_json::from_slice(bytes).map_err(|e| BodyError::Shape {
        expected: T::EXPECTED,
        why: e.to_string(),
    })?;
    body.check().map_err(BodyError::Invalid)?;
    Ok(body)
}

/// `POST /v1/services/<name>/scale`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleBody {
    /// The replica count wanted.
    pub replicas: u32,
}

impl RequestBody for ScaleBody {
    const EXPECTED: &'static str = r#"{"replicas": 3}"#;
}

/// `POST /v1/services/<name>/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The version whose spec to deploy again (none: the one before the current).
    #[serde(default)]
    pub to: Option<u64>,
}

impl RequestBody for RollbackBody {
    const EXPECTED: &'static str = r#"{"to": 2} or {}"#;
}

/// `POST /v1/images`: push an image from this node's engine into the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushBody {
    /// `name[:tag]`, as this node's engine names it (kept as given, for the engine
    /// lookup); [`RequestBody::check`] refuses one that does not normalise.
    pub reference: String,
    /// Nodes that fetch it at once (`all` or `LABEL=VALUE`).
    #[serde(default)]
    pub to: Option<String>,
    /// Move the tag even if it names another image now.
    #[serde(default)]
    pub replace: bool,
}

impl RequestBody for PushBody {
    const EXPECTED: &'static str = r#"{"reference": "web:1", "to": "all", "replace": false}"#;

    fn check(&mut self) -> Result<(), String> {
        shoal_image::normalize_reference(&self.reference).map_err(|e| e.to_string())?;
        if let Some(to) = &self.to {
            shoal_image::Preheat::parse(to)?;
        }
        Ok(())
    }
}

/// `POST /v1/pulls`: make this node's engine hold a pushed image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullBody {
    /// `name[:tag]`; normalised by [`RequestBody::check`].
    pub reference: String,
}

impl RequestBody for PullBody {
    const EXPECTED: &'static str = r#"{"reference": "web:1"}"#;

    fn check(&mut self) -> Result<(), String> {
        self.reference =
            shoal_image::normalize_reference(&self.reference).map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_decode_and_bad_ones_are_refused_by_name() {
        assert_eq!(
            decode::<ScaleBody>(br#"{"replicas": 4}"#),
            Ok(ScaleBody { replicas: 4 })
        );
        let e = decode::<ScaleBody>(b"  ").unwrap_err().to_string();
        assert!(e.contains(r#"expected JSON like {"replicas": 3}"#), "{e}");
        let e = decode::<ScaleBody>(br#"{"replica": 4}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `replica`"), "{e}");
        let e = decode::<ScaleBody>(br#"{"replicas": -1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid value"), "{e}");
        assert_eq!(decode::<RollbackBody>(b"{}"), Ok(RollbackBody { to: None }));
        assert!(matches!(
            decode::<RollbackBody>(&vec![b' '; MAX_BODY_BYTES + 1]),
            Err(BodyError::TooLarge(_))
        ));
    }

    #[test]
    fn image_bodies_check_their_reference_and_targets() {
        let pull = decode::<PullBody>(br#"{"reference": "web"}"#).unwrap();
        assert_eq!(pull.reference, "web:latest");
        let e = decode::<PullBody>(br#"{"reference": "Web App"}"#).unwrap_err();
        assert!(matches!(e, BodyError::Invalid(_)), "{e}");
        let e = decode::<PushBody>(br#"{"reference": "web:1", "to": "=x"}"#).unwrap_err();
        assert!(matches!(e, BodyError::Invalid(_)), "{e}");
        assert!(decode::<PushBody>(br#"{"reference": "web:1", "to": "all"}"#).is_ok());
    }
}

//! Portal tokens and console sessions: short signed strings that let a browser see
//! one customer's entitlements (`/portal`) or the operator console (`/console`)
//! without holding an admin token.
//!
//! A portal token is `ept1.<customer>.<expires>.<mac>`: the customer id in unpadded
//! base64url, the expiry in Unix seconds, and HMAC-SHA256 (ring) over the first three
//! parts with the key from `--portal-key-file`. It is scoped to that one customer and
//! needs no server-side state, so any replica with the same key accepts it and a key
//! change revokes every token at once. Verification is in constant time
//! (`ring::hmac::verify`), and time is a parameter: the server passes its clock
//! (the test clock under `--test-clock`), so expiry is tested without waiting.
//!
//! A console session (`ecs1.<admin token name>.<expires>.<mac>`) has the same shape,
//! signed with a key drawn at random when the process starts: sessions end with the
//! process, and are never valid on another replica.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;

use crate::time::{SECOND, Timestamp};

/// The default lifetime of a portal token.
pub const DEFAULT_TTL_US: i64 = 24 * crate::time::HOUR;
/// The longest lifetime a portal token may be given.
pub const MAX_TTL_US: i64 = 366 * crate::time::DAY;
/// Fewest bytes of key material a key file must hold.
pub const MIN_KEY_BYTES: usize = 32;

const PORTAL_PREFIX: &str = "ept1";
const SESSION_PREFIX: &str = "ecs1";

/// Why a token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no portal token was given")]
    Missing,
    #[error("the token is not a portal token, or its signature does not match")]
    Forged,
    #[error("the token expired at {0}")]
    Expired(Timestamp),
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("portal key file `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "portal key file `{path}` holds {len} bytes of key; at least {MIN_KEY_BYTES} are needed (e.g. `head -c 48 /dev/urandom | base64 > {path}`)"
    )]
    TooShort { path: String, len: usize },
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The customer id (portal tokens) or the admin token's name (console sessions).
    pub subject: String,
    pub expires: Timestamp,
}

/// An HMAC-SHA256 signing key.
pub struct Key(hmac::Key);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from its bytes.
    pub fn new(bytes: &[u8]) -> Key {
        Key(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The key in a file: its contents with surrounding whitespace trimmed (so a
    /// base64 line with a newline works), at least [`MIN_KEY_BYTES`] long.
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                path: shown,
                len: trimmed.len(),
            });
        }
        Ok(Key::new(trimmed))
    }

    /// A key drawn at random (console sessions).
    pub fn random() -> Key {
        let rng = ring::rand::SystemRandom::new();
        match hmac::Key::generate(hmac::HMAC_SHA256, &rng) {
            Ok(k) => Key(k),
            // The system's random source failing is not recoverable in any useful
            // way; two v4 UUIDs (also from the OS) still make an unguessable key.
            Err(_) => {
                let a = uuid::Uuid::new_v4().as_u128().to_le_bytes();
                let b = uuid::Uuid::new_v4().as_u128().to_le_bytes();
                Key::new(&[a, b].concat())
            }
        }
    }

    fn sign(&self, prefix: &str, subject: &str, expires: Timestamp) -> String {
        let body = format!(
            "{prefix}.{}.{}",
            B64.encode(subject.as_bytes()),
            expires.0.div_euclid(SECOND)
        );
        let mac = hmac::sign(&self.0, body.as_bytes());
        format!("{body}.{}", B64.encode(mac.as_ref()))
    }

    fn verify(&self, prefix: &str, token: &str, now: Timestamp) -> Result<Claims, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let (body, mac) = token.rsplit_once('.').ok_or(TokenError::Forged)?;
        let mac = B64.decode(mac).map_err(|_| TokenError::Forged)?;
        hmac::verify(&self.0, body.as_bytes(), &mac).map_err(|_| TokenError::Forged)?;
        // Signed by this key: the parts are ours, but read them carefully anyway.
        let mut parts = body.split('.');
        let (Some(p), Some(subject), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Forged);
        };
        if p != prefix {
            return Err(TokenError::Forged);
        }
        let subject = B64
            .decode(subject)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(TokenError::Forged)?;
        let secs: i64 = expires.parse().map_err(|_| TokenError::Forged)?;
        let expires = Timestamp(secs.saturating_mul(SECOND));
        if now >= expires {
            return Err(TokenError::Expired(expires));
        }
        Ok(Claims { subject, expires })
    }

    /// A portal token for `customer`, valid until `expires`.
    pub fn mint_portal(&self, customer: &str, expires: Timestamp) -> String {
        self.sign(PORTAL_PREFIX, customer, expires)
    }

    /// The customer a portal token was minted for, if it is genuine and not expired
    /// at `now`.
    pub fn verify_portal(&self, token: &str, now: Timestamp) -> Result<Claims, TokenError> {
        self.verify(PORTAL_PREFIX, token, now)
    }

    /// A console session for the admin token named `name`.
    pub fn mint_session(&self, name: &str, expires: Timestamp) -> String {
        self.sign(SESSION_PREFIX, name, expires)
    }

    pub fn verify_session(&self, token: &str, now: Timestamp) -> Result<Claims, TokenError> {
        self.verify(SESSION_PREFIX, token, now)
    }
}

/// The expiry of a token minted at `now` to live `ttl_us`, rounded down to a whole
/// second (as the token carries it); an error for a lifetime out of range.
pub fn expiry(now: Timestamp, ttl_us: i64) -> Result<Timestamp, String> {
    if ttl_us < SECOND {
        return Err("a portal token lives at least 1s".into());
    }
    if ttl_us > MAX_TTL_US {
        return Err(format!(
            "a portal token lives at most {}d",
            MAX_TTL_US / crate::time::DAY
        ));
    }
    let t = now.saturating_add(ttl_us).0;
    Ok(Timestamp(t - t.rem_euclid(SECOND)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp(1_767_225_600 * SECOND); // 2026-01-01

    #[test]
    fn a_token_names_its_customer_until_it_expires() {
        let k = Key::new(&[7; 32]);
        let exp = expiry(T0, DEFAULT_TTL_US).unwrap();
        let t = k.mint_portal("acme <script>", exp);
        let c = k.verify_portal(&t, T0).unwrap();
        assert_eq!(c.subject, "acme <script>");
        assert_eq!(c.expires, exp);
        assert!(k.verify_portal(&t, exp.saturating_add(-1)).is_ok());
        assert_eq!(k.verify_portal(&t, exp), Err(TokenError::Expired(exp)));
    }

    #[test]
    fn another_key_a_changed_part_or_a_session_is_forged() {
        let k = Key::new(&[7; 32]);
        let exp = expiry(T0, DEFAULT_TTL_US).unwrap();
        let t = k.mint_portal("acme", exp);
        assert_eq!(
            Key::new(&[8; 32]).verify_portal(&t, T0),
            Err(TokenError::Forged)
        );
        // The customer swapped for another, the signature kept.
        let other = B64.encode("globex");
        let parts: Vec<&str> = t.split('.').collect();
        let swapped = format!("{}.{other}.{}.{}", parts[0], parts[2], parts[3]);
        assert_eq!(k.verify_portal(&swapped, T0), Err(TokenError::Forged));
        // The expiry pushed out.
        let later = format!(
            "{}.{}.{}.{}",
            parts[0], parts[1], 9_999_999_999i64, parts[3]
        );
        assert_eq!(k.verify_portal(&later, T0), Err(TokenError::Forged));
        // A console session is not a portal token, with the same key.
        let s = k.mint_session("acme", exp);
        assert_eq!(k.verify_portal(&s, T0), Err(TokenError::Forged));
        assert!(k.verify_session(&s, T0).is_ok());
        for junk in ["x", "a.b.c.d", "ept1..0.", "....", "ept1.YQ.1.%%%"] {
            assert_eq!(k.verify_portal(junk, T0), Err(TokenError::Forged), "{junk}");
        }
        assert_eq!(k.verify_portal("  ", T0), Err(TokenError::Missing));
    }

    #[test]
    fn lifetimes_are_bounded_and_whole_seconds() {
        assert!(expiry(T0, 0).is_err());
        assert!(expiry(T0, MAX_TTL_US + 1).is_err());
        assert_eq!(
            expiry(Timestamp(T0.0 + 1), SECOND).unwrap().0,
            T0.0 + SECOND
        );
    }

    #[test]
    fn a_short_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(
            Key::from_file(&p),
            Err(KeyError::TooShort { len: 5, .. })
        ));
        std::fs::write(&p, format!("{}\n", "k".repeat(40))).unwrap();
        assert!(Key::from_file(&p).is_ok());
        assert!(matches!(
            Key::from_file(&dir.path().join("none")),
            Err(KeyError::Read { .. })
        ));
    }
}

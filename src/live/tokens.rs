//! Token files: the admin tokens for customer writes (`--admin-token-file`) and the
//! OFREP client tokens (`--ofrep-token-file`). One per line, `name:token` or a bare
//! token (named `token-<line>`); blank lines and `#` comments are skipped.
//!
//! The file is read again when its size, modification time or inode changes (looked
//! at on each use: one `stat`, cheap next to a write's sync and small next to an
//! HTTP exchange), so rotating a token is
//! editing or replacing the file. Tokens are kept as BLAKE3 hashes and compared in
//! constant time ([`subtle`]): neither a token's length nor how much of it matched
//! shows in the answer's timing.

use std::path::PathBuf;
use std::sync::Mutex;

use subtle::ConstantTimeEq;

use crate::files::Stamp;

/// Why a request is not allowed to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing `Authorization: Bearer <token>`")]
    Missing,
    #[error("the bearer token is not one of the admin tokens")]
    Wrong,
    /// The token file cannot be read: nobody is let in (fail closed).
    #[error("admin token file {0}")]
    Unreadable(String),
}

#[derive(Debug, Default)]
struct Loaded {
    stamp: Option<Stamp>,
    tokens: Vec<(String, [u8; 32])>,
}

/// The admin token file and what was last read from it.
#[derive(Debug)]
pub struct AdminTokens {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl AdminTokens {
    pub fn new(path: impl Into<PathBuf>) -> AdminTokens {
        AdminTokens {
            path: path.into(),
            loaded: Mutex::new(Loaded::default()),
        }
    }

    /// The name of the token in `authorization` (the header's value), if it is one.
    pub fn check(&self, authorization: Option<&str>) -> Result<String, AuthError> {
        let token = authorization
            .and_then(|h| {
                let (scheme, rest) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        self.check_token(token)
    }

    /// The name of `token` (a bearer token or an API key as given), if it is one.
    pub fn check_token(&self, token: &str) -> Result<String, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let loaded = self.current()?;
        let given = *blake3::hash(token.as_bytes()).as_bytes();
        let mut found = None;
        for (name, hash) in &loaded.tokens {
            if bool::from(hash.ct_eq(&given)) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found.ok_or(AuthError::Wrong)
    }
}

impl AdminTokens {
    /// The tokens as the file holds them now (read again if it changed).
    fn current(&self) -> Result<std::sync::MutexGuard<'_, Loaded>, AuthError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let unreadable =
            |e: std::io::Error| AuthError::Unreadable(format!("{}: {e}", self.path.display()));
        let now = Stamp::of(&self.path).map_err(unreadable)?;
        if loaded.stamp != Some(now) {
            let text = std::fs::read_to_string(&self.path).map_err(unreadable)?;
            loaded.tokens = parse(&text);
            loaded.stamp = Some(now);
        }
        Ok(loaded)
    }

    /// Whether a token named `name` is still in the file (a console session ends
    /// when its token is removed).
    pub fn has_name(&self, name: &str) -> Result<bool, AuthError> {
        Ok(self.current()?.tokens.iter().any(|(n, _)| n == name))
    }
}

fn parse(text: &str) -> Vec<(String, [u8; 32])> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let (name, token) = match line.split_once(':') {
                Some((n, t)) if !n.trim().is_empty() && !t.trim().is_empty() => {
                    (n.trim().to_string(), t.trim())
                }
                _ => (format!("token-{}", i + 1), line),
            };
            Some((name, *blake3::hash(token.as_bytes()).as_bytes()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_bare_tokens_and_rereads_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, "# admins\nbilling:s3cret\n\nplain-token\n").unwrap();
        let t = AdminTokens::new(&p);
        assert_eq!(t.check(Some("Bearer s3cret")).unwrap(), "billing");
        assert_eq!(t.check(Some("bearer plain-token")).unwrap(), "token-4");
        assert_eq!(t.check(Some("Bearer nope")), Err(AuthError::Wrong));
        assert_eq!(t.check(None), Err(AuthError::Missing));
        assert_eq!(t.check(Some("Basic s3cret")), Err(AuthError::Missing));
        std::fs::write(&p, "crm:rotated-token-longer\n").unwrap();
        assert_eq!(t.check(Some("Bearer s3cret")), Err(AuthError::Wrong));
        assert_eq!(t.check(Some("Bearer rotated-token-longer")).unwrap(), "crm");
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            t.check(Some("Bearer rotated-token-longer")),
            Err(AuthError::Unreadable(_))
        ));
    }
}

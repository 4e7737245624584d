//! Tenant resolution and bearer-token authentication.
//!
//! Without a tokens file every request may name its tenant in the
//! `x-kvault-tenant` metadata entry (trusted networks, tests). With one, the
//! tenant comes only from the token: a client cannot claim another tenant.

use std::collections::HashMap;
use std::path::Path;

use kvault_proto::{DEFAULT_TENANT, TENANT_HEADER};
use tonic::metadata::MetadataMap;

use crate::error::{Result, ServerError};
use crate::tier::Tenant;

/// How requests are mapped to tenants.
pub enum Auth {
    /// Tenant from metadata, `default` when absent.
    Open,
    /// Tenant from a bearer token; unknown or missing tokens are refused.
    Tokens(HashMap<String, Tenant>),
}

fn valid_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Auth {
    /// Reads `token tenant` lines (blank lines and `#` comments allowed).
    pub fn from_file(path: &Path) -> Result<Auth> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Storage(format!("{}: {e}", path.display())))?;
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(token), Some(tenant), None) if valid_tenant(tenant) && token.len() >= 16 => {
                    tokens.insert(token.to_string(), Tenant::new(tenant));
                }
                _ => {
                    return Err(ServerError::Storage(format!(
                        "{}:{}: expected `<token of 16+ chars> <tenant>`",
                        path.display(),
                        n + 1
                    )));
                }
            }
        }
        Ok(Auth::Tokens(tokens))
    }

    /// The tenant a request acts for.
    pub fn tenant(&self, md: &MetadataMap) -> Result<Tenant> {
        match self {
            Auth::Open => match md.get(TENANT_HEADER) {
                None => Ok(Tenant::new(DEFAULT_TENANT)),
                Some(v) => {
                    let name = v.to_str().ok().filter(|s| valid_tenant(s)).ok_or_else(|| {
                        ServerError::Unauthenticated(format!(
                            "{TENANT_HEADER} must be 1-64 chars of [A-Za-z0-9._-]"
                        ))
                    })?;
                    Ok(Tenant::new(name))
                }
            },
            Auth::Tokens(map) => {
                let v = md
                    .get("authorization")
                    .ok_or_else(|| ServerError::Unauthenticated("missing bearer token".into()))?;
                let token = v
                    .to_str()
                    .ok()
                    .and_then(|s| s.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        ServerError::Unauthenticated("authorization must be `Bearer <token>`".into())
                    })?;
                map.get(token)
                    .cloned()
                    .ok_or_else(|| ServerError::Unauthenticated("unknown token".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_mode_reads_header_and_validates_it() {
        let auth = Auth::Open;
        let mut md = MetadataMap::new();
        assert_eq!(auth.tenant(&md).unwrap().as_str(), "default");
        md.insert(TENANT_HEADER, "team-a".parse().unwrap());
        assert_eq!(auth.tenant(&md).unwrap().as_str(), "team-a");
        md.insert(TENANT_HEADER, "../etc".parse().unwrap());
        assert!(auth.tenant(&md).is_err());
    }

    #[test]
    fn token_mode_refuses_bad_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, "# comment\n0123456789abcdef alice\n").unwrap();
        let auth = Auth::from_file(&p).unwrap();
        let mut md = MetadataMap::new();
        assert!(auth.tenant(&md).is_err());
        md.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(matches!(auth.tenant(&md), Err(ServerError::Unauthenticated(_))));
        md.insert("authorization", "Bearer 0123456789abcdef".parse().unwrap());
        assert_eq!(auth.tenant(&md).unwrap().as_str(), "alice");
        // The tenant header is ignored when tokens are configured.
        md.insert(TENANT_HEADER, "bob".parse().unwrap());
        assert_eq!(auth.tenant(&md).unwrap().as_str(), "alice");
    }

    #[test]
    fn malformed_tokens_file_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, "short alice\n").unwrap();
        let err = Auth::from_file(&p).err().unwrap();
        assert!(err.to_string().contains(":1:"), "{err}");
    }
}

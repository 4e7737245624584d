//! Namespace ids and chained chunk keys.
//!
//! A chunk key is `blake3(namespace_id ‖ parent_key ‖ token ids as LE u32)`,
//! with an all-zero parent for the first chunk. Chaining means a key names
//! the whole prefix up to and including its chunk, so a longest-prefix lookup
//! is a walk down the key list. blake3 is cryptographic: a tenant cannot forge
//! a collision with another's prefix.

use std::fmt;

use crate::model::ModelError;

/// Hash of a model layout; caches of different layouts never share keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceId(pub [u8; 32]);

/// 32-byte key naming one chunk and, through the chain, its whole prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub [u8; 32]);

impl ChunkKey {
    /// Key of the chunk holding `tokens`, following `parent` (None for the first chunk).
    pub fn derive(ns: &NamespaceId, parent: Option<&ChunkKey>, tokens: &[u32]) -> ChunkKey {
        let mut h = blake3::Hasher::new();
        h.update(&ns.0);
        h.update(&parent.map_or([0u8; 32], |p| p.0));
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        ChunkKey(*h.finalize().as_bytes())
    }

    /// Parses a key received on the wire.
    pub fn from_slice(b: &[u8]) -> Result<ChunkKey, ModelError> {
        let arr: [u8; 32] = b.try_into().map_err(|_| ModelError::BadKey { len: b.len() })?;
        Ok(ChunkKey(arr))
    }

    /// Lowercase hex of the key.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

/// Keys for `tokens` split into chunks of `chunk_tokens`; a trailing partial
/// chunk gets a key of its own tokens.
pub fn chain_keys(ns: &NamespaceId, tokens: &[u32], chunk_tokens: usize) -> Vec<ChunkKey> {
    let mut keys = Vec::with_capacity(tokens.len().div_ceil(chunk_tokens.max(1)));
    let mut parent: Option<ChunkKey> = None;
    for piece in tokens.chunks(chunk_tokens.max(1)) {
        let k = ChunkKey::derive(ns, parent.as_ref(), piece);
        keys.push(k);
        parent = Some(k);
    }
    keys
}

fn hex(b: &[u8]) -> String {
    use fmt::Write;
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0[..8]))
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkKey({})", self.to_hex())
    }
}

impl fmt::Display for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0[..8]))
    }
}

impl fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamespaceId({})", hex(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_every_prior_token() {
        let ns = NamespaceId([7; 32]);
        let a: Vec<u32> = (0..10).collect();
        let mut b = a.clone();
        b[1] = 99;
        let ka = chain_keys(&ns, &a, 4);
        let kb = chain_keys(&ns, &b, 4);
        assert_eq!(ka.len(), 3);
        // A change in the first chunk changes every later key.
        assert!(ka.iter().zip(&kb).all(|(x, y)| x != y));
    }

    #[test]
    fn prefix_keys_are_shared() {
        let ns = NamespaceId([1; 32]);
        let long: Vec<u32> = (0..20).collect();
        let k_long = chain_keys(&ns, &long, 8);
        let k_short = chain_keys(&ns, &long[..16], 8);
        assert_eq!(&k_long[..2], &k_short[..]);
        // The trailing partial chunk is keyed by its own tokens.
        assert_eq!(k_long[2], ChunkKey::derive(&ns, Some(&k_long[1]), &long[16..]));
    }

    #[test]
    fn namespace_separates_keys() {
        let t = [1u32, 2, 3];
        assert_ne!(
            ChunkKey::derive(&NamespaceId([0; 32]), None, &t),
            ChunkKey::derive(&NamespaceId([1; 32]), None, &t)
        );
    }

    #[test]
    fn matches_blake3_definition() {
        let ns = NamespaceId([3; 32]);
        let mut input = Vec::new();
        input.extend_from_slice(&ns.0);
        input.extend_from_slice(&[0u8; 32]);
        input.extend_from_slice(&5u32.to_le_bytes());
        assert_eq!(
            ChunkKey::derive(&ns, None, &[5]).0,
            *blake3::hash(&input).as_bytes()
        );
    }

    #[test]
    fn bad_key_length_is_an_error() {
        assert!(ChunkKey::from_slice(&[0; 31]).is_err());
        assert!(ChunkKey::from_slice(&[0; 32]).is_ok());
    }
}

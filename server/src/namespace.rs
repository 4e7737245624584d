//! The namespace registry: which layout each model id is bound to.
//!
//! A model id is bound to its layout on first use and the binding is kept in
//! `namespaces.json` under the data directory, so it survives restarts. A
//! later request under the same model id with another layout is refused: two
//! writers disagreeing about a model's shape is a bug worth surfacing, not a
//! second namespace to create silently.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kvault_codec::Dtype;
use kvault_proto::{Layout, Rope};
use serde::{Deserialize, Serialize};

use crate::error::{Result, ServerError};

const FILE: &str = "namespaces.json";

/// Persistent model id → layout bindings.
pub struct NamespaceRegistry {
    path: PathBuf,
    // std Mutex: held only for map lookups and never across an await.
    layouts: Mutex<BTreeMap<String, Layout>>,
    // Serialises writers of the file so two first-uses cannot interleave.
    write_lock: Mutex<()>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    model_id: String,
    layers: u32,
    kv_heads: u32,
    head_dim: u32,
    dtype: String,
    chunk_tokens: u32,
    rope_theta: Option<f32>,
    rope_dim: Option<u32>,
}

impl Record {
    fn from_layout(l: &Layout) -> Record {
        Record {
            model_id: l.model_id.clone(),
            layers: l.layers,
            kv_heads: l.kv_heads,
            head_dim: l.head_dim,
            dtype: l.dtype.name().to_string(),
            chunk_tokens: l.chunk_tokens,
            rope_theta: l.rope.map(|r| r.theta),
            rope_dim: l.rope.map(|r| r.rotary_dim),
        }
    }

    fn into_layout(self) -> Result<Layout> {
        let bad = |e: String| ServerError::Storage(format!("{FILE}: {e}"));
        let dtype: Dtype = self.dtype.parse().map_err(|e| bad(format!("{e}")))?;
        let rope = match (self.rope_theta, self.rope_dim) {
            (Some(theta), Some(rotary_dim)) => Some(Rope { theta, rotary_dim }),
            _ => None,
        };
        let l = Layout {
            model_id: self.model_id,
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype,
            chunk_tokens: self.chunk_tokens,
            rope,
        };
        l.validate().map_err(|e| bad(e.to_string()))?;
        Ok(l)
    }
}

/// Short human form of a layout for error messages.
pub fn describe(l: &Layout) -> String {
    let rope = l
        .rope
        .map(|r| format!(" rope(theta={}, dim={})", r.theta, r.rotary_dim))
        .unwrap_or_default();
    format!(
        "layers={} kv_heads={} head_dim={} dtype={} chunk_tokens={}{rope}",
        l.layers, l.kv_heads, l.head_dim, l.dtype, l.chunk_tokens
    )
}

impl NamespaceRegistry {
    /// Loads the registry from `dir`, creating an empty one if absent.
    pub fn open(dir: &Path) -> Result<NamespaceRegistry> {
        let path = dir.join(FILE);
        let mut layouts = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let records: Vec<Record> = serde_json::from_slice(&bytes)
                    .map_err(|e| ServerError::Storage(format!("{}: {e}", path.display())))?;
                for r in records {
                    let l = r.into_layout()?;
                    layouts.insert(l.model_id.clone(), l);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ServerError::Storage(format!("{}: {e}", path.display()))),
        }
        Ok(NamespaceRegistry {
            path,
            layouts: Mutex::new(layouts),
            write_lock: Mutex::new(()),
        })
    }

    /// Number of registered model ids.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The layout `model_id` is bound to, if any.
    pub fn layout_of(&self, model_id: &str) -> Option<Layout> {
        self.lock().get(model_id).cloned()
    }

    /// Whether no model id is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Layout>> {
        // A poisoned lock only means another thread panicked mid-lookup; the
        // map itself is always consistent (inserts are single calls).
        self.layouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `layout` against the binding of its model id. `Ok(true)` when
    /// bound to exactly this layout, `Ok(false)` when the model id is new.
    pub fn check(&self, layout: &Layout) -> Result<bool> {
        match self.lock().get(&layout.model_id) {
            None => Ok(false),
            Some(bound) if bound.same_shape(layout) => Ok(true),
            Some(bound) => Err(ServerError::LayoutMismatch {
                model_id: layout.model_id.clone(),
                registered: describe(bound),
                requested: describe(layout),
            }),
        }
    }

    /// Binds the model id to `layout` on first use (durably), or checks it.
    /// Blocking: does file I/O on first use; call from a blocking context.
    pub fn register(&self, layout: &Layout) -> Result<()> {
        if self.check(layout)? {
            return Ok(());
        }
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Another writer may have bound it while we waited.
        if self.check(layout)? {
            return Ok(());
        }
        let mut next: Vec<Record> = self.lock().values().map(Record::from_layout).collect();
        next.push(Record::from_layout(layout));
        self.persist(&next)?;
        self.lock().insert(layout.model_id.clone(), layout.clone());
        tracing::info!(model_id = %layout.model_id, layout = %describe(layout), "registered model layout");
        Ok(())
    }

    /// Writes the file atomically: temp file, fsync, rename, fsync the directory.
    fn persist(&self, records: &[Record]) -> Result<()> {
        let io = |e: std::io::Error| ServerError::Storage(format!("{}: {e}", self.path.display()));
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(records).map_err(|e| ServerError::Storage(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(layers: u32) -> Layout {
        Layout {
            model_id: "m".into(),
            layers,
            kv_heads: 3,
            head_dim: 64,
            dtype: Dtype::F16,
            chunk_tokens: 256,
            rope: None,
        }
    }

    #[test]
    fn binding_survives_reopen_and_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = NamespaceRegistry::open(dir.path()).unwrap();
        assert!(!r.check(&layout(30)).unwrap());
        r.register(&layout(30)).unwrap();
        r.register(&layout(30)).unwrap();
        assert_eq!(r.len(), 1);
        drop(r);
        let r = NamespaceRegistry::open(dir.path()).unwrap();
        assert!(r.check(&layout(30)).unwrap());
        let err = r.register(&layout(31)).unwrap_err();
        assert!(matches!(err, ServerError::LayoutMismatch { .. }), "{err}");
        assert!(err.to_string().contains("layers=30"));
    }

    #[test]
    fn corrupt_registry_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let err = NamespaceRegistry::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("namespaces.json"), "{err}");
    }
}

//! Where decoded rows go: the output addressing shared by every kernel.
//!
//! Each output part `out_slot = 2 * layer + (0 for K, 1 for V)` has a cache
//! `[blocks][block_size][channels]` starting at `slots[out_slot]`; global token `tok`
//! goes to block `block_table[tok / block_size]`, row `tok % block_size`. The canonical
//! layout `[layers][2][tokens][channels]` is one block per slot; vLLM's paged caches are
//! per-layer K and V buffers with the caller's block ids.

use kvault_codec::Dtype;

use crate::KernelError;

/// Output element type of a GPU decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    /// IEEE binary16.
    F16 = 0,
    /// bfloat16.
    Bf16 = 1,
    /// IEEE binary32.
    F32 = 2,
}

impl OutDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutDtype::F16 | OutDtype::Bf16 => 2,
            OutDtype::F32 => 4,
        }
    }

    /// The codec dtype with the same encoding.
    pub fn dtype(self) -> Dtype {
        match self {
            OutDtype::F16 => Dtype::F16,
            OutDtype::Bf16 => Dtype::Bf16,
            OutDtype::F32 => Dtype::F32,
        }
    }

    /// The output dtype for a codec dtype.
    pub fn of(d: Dtype) -> OutDtype {
        match d {
            Dtype::F16 => OutDtype::F16,
            Dtype::Bf16 => OutDtype::Bf16,
            Dtype::F32 => OutDtype::F32,
        }
    }
}

/// Output addresses for a plan of `layers` layers, `tokens` tokens and `channels` channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutLayout {
    /// Address (device pointer, or byte offset for host emulation) of each slot's cache.
    pub slots: Vec<u64>,
    /// Block id of each run of `block_size` tokens.
    pub block_table: Vec<i32>,
    /// Tokens per block.
    pub block_size: u32,
}

impl OutLayout {
    /// The canonical layout in one buffer at `base` of exactly
    /// `layers * 2 * tokens * channels * dtype.size()` bytes.
    pub fn canonical(base: u64, layers: u32, tokens: u32, channels: u32, dtype: OutDtype) -> OutLayout {
        let part = u64::from(tokens) * u64::from(channels) * dtype.size() as u64;
        OutLayout {
            slots: (0..2 * u64::from(layers)).map(|s| base + s * part).collect(),
            block_table: vec![0],
            block_size: tokens.max(1),
        }
    }

    /// Paged caches: `k[l]` and `v[l]` are the addresses of layer `l`'s caches, each
    /// `capacity_blocks` blocks of `block_size` rows; `block_table` maps each run of
    /// `block_size` tokens (of `tokens`) to a block. Checks that every block id the tokens
    /// reach is inside the caches.
    pub fn paged(
        k: &[u64],
        v: &[u64],
        block_size: u32,
        block_table: &[u32],
        capacity_blocks: u64,
        tokens: u32,
    ) -> Result<OutLayout, KernelError> {
        if k.len() != v.len() {
            return Err(KernelError::Layout(format!(
                "{} K caches and {} V caches",
                k.len(),
                v.len()
            )));
        }
        if block_size == 0 {
            return Err(KernelError::Layout("block size 0".into()));
        }
        let used = tokens.div_ceil(block_size) as usize;
        if block_table.len() < used {
            return Err(KernelError::Layout(format!(
                "block table has {} entries, {tokens} tokens need {used}",
                block_table.len()
            )));
        }
        let mut table = Vec::with_capacity(used.max(1));
        for &b in &block_table[..used] {
            if u64::from(b) >= capacity_blocks || b > i32::MAX as u32 {
                return Err(KernelError::Layout(format!(
                    "block id {b} outside caches of {capacity_blocks} blocks"
                )));
            }
            table.push(b as i32);
        }
        if table.is_empty() {
            table.push(0);
        }
        Ok(OutLayout {
            slots: k.iter().zip(v).flat_map(|(&k, &v)| [k, v]).collect(),
            block_table: table,
            block_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_layouts_check_their_block_ids() {
        let ok = OutLayout::paged(&[0, 100], &[50, 150], 16, &[3, 1, 9], 4, 32).unwrap();
        assert_eq!(ok.slots, vec![0, 50, 100, 150]);
        assert_eq!(ok.block_table, vec![3, 1]);
        assert!(OutLayout::paged(&[0], &[50], 16, &[3, 4], 4, 32).is_err());
        assert!(OutLayout::paged(&[0], &[50], 16, &[3], 4, 32).is_err());
        assert!(OutLayout::paged(&[0], &[], 16, &[3], 4, 8).is_err());
        assert!(OutLayout::paged(&[0], &[1], 0, &[3], 4, 8).is_err());
        let c = OutLayout::canonical(1000, 2, 3, 4, OutDtype::F16);
        assert_eq!(c.slots, vec![1000, 1024, 1048, 1072]);
    }
}

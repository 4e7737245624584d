//! Reading a Llama-architecture GGUF file: hyper-parameters from the
//! metadata, the tokenizer's vocabulary and merges, and the weights,
//! dequantized to f32 (a 135M model is 540 MB in f32; f32 matmuls keep the
//! runner exact enough to compare against an independent implementation).
//!
//! The file is checked before any tensor is read: the architecture must be
//! `llama` and every tensor must lie inside the file, so a truncated download
//! is reported as such instead of as an I/O error halfway through loading.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::ModelError;
use super::tokenizer::TokenizerSpec;

/// Hyper-parameters of a Llama model, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `general.name`, when present.
    pub name: String,
    /// Transformer layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Hidden size.
    pub embedding: usize,
    /// Feed-forward hidden size.
    pub feed_forward: usize,
    /// RoPE base frequency (`llama.rope.freq_base`).
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Context length the model was trained for: the most tokens it attends over.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// One decoder layer's weights, matrices stored `[in, out]` (transposed
/// once at load so that every matmul is `x · W` on contiguous memory).
#[derive(Debug)]
pub(crate) struct LayerWeights {
    pub attn_norm: Tensor,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub ffn_norm: Tensor,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
}

/// All weights of the model.
#[derive(Debug)]
pub(crate) struct Weights {
    /// `[vocab, embedding]`.
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `[embedding, vocab]` (tied to `embed` when the GGUF has no `output.weight`).
    pub lm_head: Tensor,
}

/// Everything loaded from one GGUF file.
pub(crate) struct GgufModel {
    pub config: LlamaConfig,
    pub tokenizer: TokenizerSpec,
    pub weights: Weights,
}

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value, ModelError> {
    c.metadata
        .get(key)
        .ok_or_else(|| ModelError::Metadata(format!("missing {key}")))
}

fn meta_usize(c: &Content, key: &str) -> Result<usize, ModelError> {
    let v = meta(c, key)?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        _ => return Err(ModelError::Metadata(format!("{key} is not a count: {v:?}"))),
    };
    usize::try_from(n).map_err(|_| ModelError::Metadata(format!("{key} = {n} is too large")))
}

fn meta_f32(c: &Content, key: &str) -> Result<f32, ModelError> {
    match meta(c, key)? {
        Value::F32(x) => Ok(*x),
        Value::F64(x) => Ok(*x as f32),
        v => Err(ModelError::Metadata(format!("{key} is not a float: {v:?}"))),
    }
}

fn meta_str<'a>(c: &'a Content, key: &str) -> Result<&'a str, ModelError> {
    match meta(c, key)? {
        Value::String(s) => Ok(s),
        v => Err(ModelError::Metadata(format!("{key} is not a string: {v:?}"))),
    }
}

fn meta_strings(c: &Content, key: &str) -> Result<Vec<String>, ModelError> {
    match meta(c, key)? {
        Value::Array(a) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(ModelError::Metadata(format!("{key} holds a non-string {v:?}"))),
            })
            .collect(),
        v => Err(ModelError::Metadata(format!("{key} is not an array: {v:?}"))),
    }
}

fn meta_i32s(c: &Content, key: &str) -> Result<Vec<i32>, ModelError> {
    match c.metadata.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::I32(x) => Ok(*x),
                Value::U32(x) => Ok(*x as i32),
                v => Err(ModelError::Metadata(format!("{key} holds a non-integer {v:?}"))),
            })
            .collect(),
        Some(v) => Err(ModelError::Metadata(format!("{key} is not an array: {v:?}"))),
    }
}

fn config(c: &Content) -> Result<LlamaConfig, ModelError> {
    let arch = meta_str(c, "general.architecture")?;
    if arch != "llama" {
        return Err(ModelError::NotLlama(arch.to_string()));
    }
    let heads = meta_usize(c, "llama.attention.head_count")?;
    let kv_heads = meta_usize(c, "llama.attention.head_count_kv").unwrap_or(heads);
    let embedding = meta_usize(c, "llama.embedding_length")?;
    let head_dim = embedding.checked_div(heads).unwrap_or(0);
    if heads == 0
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || head_dim * heads != embedding
        || !head_dim.is_multiple_of(2)
    {
        return Err(ModelError::Metadata(format!(
            "inconsistent attention shape: {heads} heads, {kv_heads} KV heads, embedding {embedding}"
        )));
    }
    if let Ok(rot) = meta_usize(c, "llama.rope.dimension_count")
        && rot != head_dim
    {
        return Err(ModelError::Metadata(format!(
            "partial rotary embedding ({rot} of {head_dim} dims) is not supported"
        )));
    }
    let tokens = match meta(c, "tokenizer.ggml.tokens")? {
        Value::Array(a) => a.len(),
        _ => 0,
    };
    Ok(LlamaConfig {
        name: meta_str(c, "general.name").unwrap_or("").to_string(),
        layers: meta_usize(c, "llama.block_count")?,
        heads,
        kv_heads,
        head_dim,
        embedding,
        feed_forward: meta_usize(c, "llama.feed_forward_length")?,
        rope_theta: meta_f32(c, "llama.rope.freq_base").unwrap_or(10_000.0),
        rms_eps: meta_f32(c, "llama.attention.layer_norm_rms_epsilon")?,
        context_length: meta_usize(c, "llama.context_length")?,
        vocab: meta_usize(c, "llama.vocab_size").unwrap_or(tokens),
    })
}

/// Reads a tensor, dequantizes it to f32 and checks its shape.
fn read_tensor(
    c: &Content,
    r: &mut BufReader<File>,
    name: &str,
    shape: &[usize],
) -> Result<Tensor, ModelError> {
    if !c.tensor_infos.contains_key(name) {
        return Err(ModelError::MissingTensor(name.to_string()));
    }
    let q = c.tensor(r, name, &Device::Cpu)?;
    let t = q.dequantize(&Device::Cpu)?;
    if t.dims() != shape {
        return Err(ModelError::Metadata(format!(
            "tensor {name} has shape {:?}, expected {shape:?}",
            t.dims()
        )));
    }
    Ok(t)
}

/// llama.cpp's converter permutes the rows of `attn_q`/`attn_k` within each
/// head so that RoPE rotates adjacent pairs `(2i, 2i+1)`. Undoing it gives
/// back the Hugging Face order, where RoPE rotates `(i, i + d/2)`: the keys
/// this runner stores are then those an engine running the HF weights holds.
fn unpermute_rows(w: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor, ModelError> {
    let cols = w.dim(1)?;
    Ok(w.reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((heads * head_dim, cols))?)
}

/// `[out, in]` → contiguous `[in, out]`.
fn for_matmul(w: Tensor) -> Result<Tensor, ModelError> {
    Ok(w.t()?.contiguous()?)
}

/// Loads a Llama GGUF: metadata, tokenizer and weights.
pub(crate) fn load(path: &Path) -> Result<GgufModel, ModelError> {
    let io = |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut r = BufReader::new(file);
    let c = Content::read(&mut r).map_err(|e| ModelError::Format {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let config = config(&c)?;
    // Every tensor must end inside the file before any is read.
    for (name, info) in &c.tensor_infos {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
        let end = c
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|x| x.checked_add(bytes));
        if end.is_none_or(|end| end > file_len) {
            return Err(ModelError::Truncated {
                path: path.display().to_string(),
                reason: format!(
                    "tensor {name} ends at byte {} but the file has {file_len}",
                    end.map_or("overflow".to_string(), |e| e.to_string())
                ),
            });
        }
    }
    let tokenizer = TokenizerSpec {
        model: meta_str(&c, "tokenizer.ggml.model")?.to_string(),
        pre: meta_str(&c, "tokenizer.ggml.pre")
            .unwrap_or("default")
            .to_string(),
        tokens: meta_strings(&c, "tokenizer.ggml.tokens")?,
        token_types: meta_i32s(&c, "tokenizer.ggml.token_type")?,
        merges: meta_strings(&c, "tokenizer.ggml.merges")?,
        eos: meta_usize(&c, "tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(|x| u32::try_from(x).ok()),
    };
    if tokenizer.tokens.len() != config.vocab {
        return Err(ModelError::Metadata(format!(
            "{} tokens for a vocabulary of {}",
            tokenizer.tokens.len(),
            config.vocab
        )));
    }

    let (d, hd) = (config.embedding, config.head_dim);
    let kvd = config.kv_heads * hd;
    let embed = read_tensor(&c, &mut r, "token_embd.weight", &[config.vocab, d])?;
    let mut layers = Vec::with_capacity(config.layers);
    for i in 0..config.layers {
        let mut t = |n: &str, shape: &[usize]| read_tensor(&c, &mut r, &format!("blk.{i}.{n}"), shape);
        let attn_norm = t("attn_norm.weight", &[d])?;
        let wq = unpermute_rows(&t("attn_q.weight", &[d, d])?, config.heads, hd)?;
        let wk = unpermute_rows(&t("attn_k.weight", &[kvd, d])?, config.kv_heads, hd)?;
        let wv = t("attn_v.weight", &[kvd, d])?;
        let wo = t("attn_output.weight", &[d, d])?;
        let ffn_norm = t("ffn_norm.weight", &[d])?;
        let ff = config.feed_forward;
        let w_gate = t("ffn_gate.weight", &[ff, d])?;
        let w_up = t("ffn_up.weight", &[ff, d])?;
        let w_down = t("ffn_down.weight", &[d, ff])?;
        layers.push(LayerWeights {
            attn_norm,
            wq: for_matmul(wq)?,
            wk: for_matmul(wk)?,
            wv: for_matmul(wv)?,
            wo: for_matmul(wo)?,
            ffn_norm,
            w_gate: for_matmul(w_gate)?,
            w_up: for_matmul(w_up)?,
            w_down: for_matmul(w_down)?,
        });
    }
    let norm = read_tensor(&c, &mut r, "output_norm.weight", &[d])?;
    let lm_head = if c.tensor_infos.contains_key("output.weight") {
        for_matmul(read_tensor(&c, &mut r, "output.weight", &[config.vocab, d])?)?
    } else {
        for_matmul(embed.clone())?
    };
    Ok(GgufModel {
        config,
        tokenizer,
        weights: Weights {
            embed,
            layers,
            norm,
            lm_head,
        },
    })
}

//! The Llama forward pass on candle ops, with a KV cache that can be read
//! out and injected (candle's own `quantized_llama` keeps its cache private).
//!
//! Per layer: RMSNorm → Q/K/V projections → RoPE (rotate-half, the Hugging
//! Face convention, with the GGUF's rope base) → grouped-query attention over
//! cache + new tokens → output projection; RMSNorm → SwiGLU feed-forward.
//! Keys and values are rounded to f16 as they enter the cache, as an engine
//! with an fp16 cache holds them: storing them in kvault as f16 is then
//! lossless, and a continuation from an injected cache is bit-identical to
//! one after a fresh prefill.

use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::gguf::{LlamaConfig, Weights};
use crate::attend::{Partial, merge};

/// Tokens per forward step during prefill. Steps start at absolute multiples
/// of this (so at chunk boundaries of 256-token chunks): the same token
/// always runs in the same step shape, whether the prefix before it was
/// computed or fetched, which keeps results bit-identical.
pub const STEP_TOKENS: usize = 256;

/// Per-layer keys and values of the tokens seen so far, `[kv_heads, tokens, head_dim]` f32.
///
/// With attention offloaded, the first `remote` positions are not held
/// here: their attention comes from a [`RemoteAttention`], and the tensors
/// hold positions `remote..len`.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    pub(crate) len: usize,
    pub(crate) remote: usize,
}

/// Attention over positions the runner does not hold (a prefix whose KV
/// stays on kvault servers), computed elsewhere and merged exactly with
/// the runner's own partial over the positions it holds.
pub trait RemoteAttention {
    /// For `t` query tokens of `layer` (`q` is `[t][heads][head_dim]`,
    /// after RoPE), the partial over the remote positions, one per token.
    fn attend(&mut self, layer: usize, q: &[f32], t: usize, scale: f32) -> Result<Vec<Partial>, ModelError>;
}

impl KvCache {
    /// An empty cache for `cfg`.
    pub fn empty(cfg: &LlamaConfig) -> Result<KvCache, ModelError> {
        let z = Tensor::zeros((cfg.kv_heads, 0, cfg.head_dim), DType::F32, &Device::Cpu)?;
        Ok(KvCache {
            layers: (0..cfg.layers).map(|_| (z.clone(), z.clone())).collect(),
            len: 0,
            remote: 0,
        })
    }

    /// An empty cache after `remote` positions held elsewhere.
    pub fn after_remote(cfg: &LlamaConfig, remote: usize) -> Result<KvCache, ModelError> {
        let mut c = KvCache::empty(cfg)?;
        c.len = remote;
        c.remote = remote;
        Ok(c)
    }

    /// Leading positions whose KV is held elsewhere.
    pub fn remote(&self) -> usize {
        self.remote
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which positions' logits a forward step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Logits {
    None,
    Last,
    All,
}

/// Weights plus the RoPE tables.
pub(crate) struct Llama {
    pub cfg: LlamaConfig,
    pub w: Weights,
    /// `[context, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
}

fn round_f16(t: &Tensor) -> Result<Tensor, ModelError> {
    Ok(t.to_dtype(DType::F16)?.to_dtype(DType::F32)?)
}

impl Llama {
    pub fn new(cfg: LlamaConfig, w: Weights) -> Result<Llama, ModelError> {
        let half = cfg.head_dim / 2;
        let n = cfg.context_length;
        let theta = cfg.rope_theta as f64;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for i in 0..half {
                let inv = theta.powf(-((2 * i) as f64) / cfg.head_dim as f64);
                let a = p as f64 * inv;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (n, half), &Device::Cpu)?;
        Ok(Llama { cfg, w, cos, sin })
    }

    /// Runs `tokens` through the model after what `cache` holds, in steps
    /// aligned to [`STEP_TOKENS`], and appends their K/V to the cache.
    /// Returns the requested logits, `[n, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        mut remote: Option<&mut (dyn RemoteAttention + '_)>,
    ) -> Result<Option<Tensor>, ModelError> {
        if cache.remote > 0 && remote.is_none() {
            return Err(ModelError::BadInput(format!(
                "the cache's first {} positions are held remotely and no remote attention is set",
                cache.remote
            )));
        }
        let end = cache.len + tokens.len();
        if end > self.cfg.context_length {
            return Err(ModelError::TooLong {
                tokens: end,
                context: self.cfg.context_length,
            });
        }
        if let Some(bad) = tokens.iter().find(|t| **t as usize >= self.cfg.vocab) {
            return Err(ModelError::BadInput(format!(
                "token id {bad} outside the vocabulary of {}",
                self.cfg.vocab
            )));
        }
        let mut outs = Vec::new();
        let mut rest = tokens;
        while !rest.is_empty() {
            let room = STEP_TOKENS - cache.len % STEP_TOKENS;
            let (step, next) = rest.split_at(room.min(rest.len()));
            let want = match logits {
                Logits::All => Logits::All,
                Logits::Last if next.is_empty() => Logits::Last,
                _ => Logits::None,
            };
            if let Some(l) = self.step(step, cache, want, remote.as_deref_mut())? {
                outs.push(l);
            }
            rest = next;
        }
        match outs.len() {
            0 => Ok(None),
            1 => Ok(outs.pop()),
            _ => Ok(Some(Tensor::cat(&outs, 0)?)),
        }
    }

    /// One forward step over `tokens` (at most a step's worth). Hot path.
    fn step(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        mut remote: Option<&mut (dyn RemoteAttention + '_)>,
    ) -> Result<Option<Tensor>, ModelError> {
        let c = &self.cfg;
        let (t, p) = (tokens.len(), cache.len);
        let s = p + t;
        let (h, kvh, hd) = (c.heads, c.kv_heads, c.head_dim);
        let g = h / kvh;
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.w.embed.index_select(&ids, 0)?;
        let cos = self.cos.narrow(0, p, t)?;
        let sin = self.sin.narrow(0, p, t)?;
        // Causal mask over [past + new]: new token i sees keys 0..=p+i.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..s).map(move |j| if j <= p + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), &Device::Cpu)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Offloaded: the local tensors hold positions remote..s only.
        let r = cache.remote;
        let local_mask = match r {
            0 => None,
            _ => Some(mask.narrow(1, r, s - r)?),
        };
        for (li, (lw, (ck, cv))) in self.w.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let xn = candle_nn::ops::rms_norm(&x, &lw.attn_norm, c.rms_eps)?;
            let heads = |w: &Tensor, n: usize| -> Result<Tensor, ModelError> {
                Ok(xn.matmul(w)?.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()?)
            };
            let rope = |x: Tensor| -> Result<Tensor, ModelError> {
                Ok(candle_nn::rotary_emb::rope(&x.unsqueeze(0)?, &cos, &sin)?.squeeze(0)?)
            };
            let q = rope(heads(&lw.wq, h)?)?;
            let k = round_f16(&rope(heads(&lw.wk, kvh)?)?)?;
            let v = round_f16(&heads(&lw.wv, kvh)?)?;
            *ck = Tensor::cat(&[&*ck, &k], 1)?;
            *cv = Tensor::cat(&[&*cv, &v], 1)?;
            if let (Some(lm), Some(ra)) = (&local_mask, remote.as_deref_mut()) {
                let o = offloaded_attention(li, &q, ck, cv, lm, scale, g, ra)?;
                x = (x + o.matmul(&lw.wo)?)?;
                let xn = candle_nn::ops::rms_norm(&x, &lw.ffn_norm, c.rms_eps)?;
                let gate = candle_nn::ops::silu(&xn.matmul(&lw.w_gate)?)?;
                let ff = (gate * xn.matmul(&lw.w_up)?)?.matmul(&lw.w_down)?;
                x = (x + ff)?;
                continue;
            }
            // GQA: query heads j*g..(j+1)*g share KV head j, so the g heads'
            // rows stack into one matmul per KV head, with no K/V copies.
            let q = q.reshape((kvh, g * t, hd))?;
            let scores = (q.matmul(&ck.t()?)? * scale)?
                .reshape((kvh, g, t, s))?
                .broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((kvh, g * t, s))?;
            let o = probs
                .matmul(cv)?
                .reshape((h, t, hd))?
                .transpose(0, 1)?
                .reshape((t, h * hd))?;
            x = (x + o.matmul(&lw.wo)?)?;
            let xn = candle_nn::ops::rms_norm(&x, &lw.ffn_norm, c.rms_eps)?;
            let gate = candle_nn::ops::silu(&xn.matmul(&lw.w_gate)?)?;
            let ff = (gate * xn.matmul(&lw.w_up)?)?.matmul(&lw.w_down)?;
            x = (x + ff)?;
        }
        cache.len = s;
        let x = match logits {
            Logits::None => return Ok(None),
            Logits::Last => x.narrow(0, t - 1, 1)?,
            Logits::All => x,
        };
        let xn = candle_nn::ops::rms_norm(&x, &self.w.norm, c.rms_eps)?;
        Ok(Some(xn.matmul(&self.w.lm_head)?))
    }
}

/// Attention of `q` (`[heads, t, head_dim]`) with the remote positions'
/// partial from `remote` merged with the local partial over `ck`, `cv`
/// (`[kv_heads, local, head_dim]`, causal `mask` `[t, local]`). Returns `[t, heads·head_dim]`.
#[allow(clippy::too_many_arguments)]
fn offloaded_attention(
    layer: usize,
    q: &Tensor,
    ck: &Tensor,
    cv: &Tensor,
    mask: &Tensor,
    scale: f64,
    g: usize,
    remote: &mut (dyn RemoteAttention + '_),
) -> Result<Tensor, ModelError> {
    let (h, t, hd) = q.dims3()?;
    let kvh = h / g;
    // Local partial: scores, their row max m and l = Σ exp(s − m); lse = m + ln l.
    let qg = q.reshape((kvh, g * t, hd))?;
    let scores = (qg.matmul(&ck.t()?)? * scale)?
        .reshape((kvh, g, t, ()))?
        .broadcast_add(mask)?
        .reshape((kvh, g * t, ()))?;
    let m = scores.max_keepdim(2)?;
    let e = scores.broadcast_sub(&m)?.exp()?;
    let l = e.sum_keepdim(2)?;
    let o = e.matmul(cv)?.broadcast_div(&l)?; // [kvh, g*t, hd]
    let lse = (m + l.log()?)?; // [kvh, g*t, 1]
    // Token-major [t][heads][hd] for the merge.
    let o = o
        .reshape((h, t, hd))?
        .transpose(0, 1)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let lse = lse
        .reshape((h, t))?
        .t()?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let qv = q.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let parts = remote.attend(layer, &qv, t, scale as f32)?;
    if parts.len() != t {
        return Err(ModelError::Remote(format!(
            "remote attention answered {} partials for {t} tokens",
            parts.len()
        )));
    }
    let mut out = Vec::with_capacity(t * h * hd);
    for (i, rp) in parts.iter().enumerate() {
        let local = Partial::new(
            h,
            hd,
            o[i * h * hd..(i + 1) * h * hd].to_vec(),
            lse[i * h..(i + 1) * h].to_vec(),
        )
        .map_err(|e| ModelError::Remote(e.to_string()))?;
        let merged = merge(&[rp, &local]).map_err(|e| ModelError::Remote(e.to_string()))?;
        out.extend_from_slice(&merged.o);
    }
    Ok(Tensor::from_vec(out, (t, h * hd), &Device::Cpu)?)
}

/// Log-probability of `target` under `logits` (one row), in f64.
pub(crate) fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|l| (*l as f64 - max).exp()).sum();
    logits
        .get(target)
        .map_or(f64::NEG_INFINITY, |l| *l as f64 - max - sum.ln())
}

/// Index of the largest logit (the first one on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Last dimension of a 2-D logits tensor as rows of f32.
pub(crate) fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

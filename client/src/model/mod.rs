//! A Llama-architecture model runner on candle (CPU), for GGUF files such as
//! SmolLM2-135M-Instruct: the tool that turns documents into the KV caches
//! kvault stores, and that shows what a cached prefix saves.
//!
//! What it is: GGUF loading ([`gguf`]), the tokenizer built from the GGUF's
//! metadata ([`tokenizer`]), and a forward pass of our own ([`llama`]) whose
//! KV cache can be read out in kvault's canonical layout
//! `[layers][2][tokens][kv_heads][head_dim]` (keys after RoPE, heads in the
//! Hugging Face order) and injected back. What it is not: a serving engine
//! (no batching, no sampling beyond greedy, CPU only).
//!
//! Start at [`LlamaModel::load`], then [`LlamaModel::prefill`] and
//! [`Session`].

pub mod gguf;
pub mod llama;
pub mod tokenizer;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use kvault_codec::{CodecError, Dtype, KvShape, KvTensor};
use thiserror::Error;

pub use gguf::LlamaConfig;
pub use llama::{KvCache, RemoteAttention, STEP_TOKENS};
pub use tokenizer::Tokenizer;

use llama::{Llama, Logits};

/// Why the model could not be loaded or run.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The model file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a GGUF file, or its header or metadata is broken.
    #[error("{path}: not a readable GGUF file: {reason}")]
    Format {
        /// The file.
        path: String,
        /// Parser's message.
        reason: String,
    },
    /// The file ends before its tensors do (an interrupted download).
    #[error("{path}: truncated GGUF file: {reason}")]
    Truncated {
        /// The file.
        path: String,
        /// Which tensor runs past the end.
        reason: String,
    },
    /// The GGUF holds another architecture.
    #[error("model architecture {0:?} is not supported (only \"llama\")")]
    NotLlama(String),
    /// A metadata key is missing or inconsistent.
    #[error("bad GGUF metadata: {0}")]
    Metadata(String),
    /// A weight tensor is missing.
    #[error("GGUF lacks tensor {0}")]
    MissingTensor(String),
    /// The tokenizer metadata cannot be used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A document or prompt with no tokens.
    #[error("empty input: nothing to prefill")]
    EmptyInput,
    /// More tokens than the model's context holds.
    #[error("{tokens} tokens exceed the model's context of {context}")]
    TooLong {
        /// Tokens asked for (cached + new).
        tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// Token ids or arguments the model cannot take.
    #[error("bad input: {0}")]
    BadInput(String),
    /// An injected KV cache does not fit the model.
    #[error("KV cache does not fit the model: {0}")]
    BadKv(String),
    /// Attention offloaded to kvault servers failed.
    #[error("remote attention: {0}")]
    Remote(String),
    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// A KV tensor could not be built or converted.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// A loaded model: weights, configuration and tokenizer.
pub struct LlamaModel {
    llama: Llama,
    tokenizer: Tokenizer,
}

/// The result of a prefill.
#[derive(Debug)]
pub struct Prefill {
    /// KV of the past and the new tokens: f32, canonical layout, keys after RoPE.
    pub kv: KvTensor,
    /// Logits after the last new token (predicting the next one).
    pub last_logits: Vec<f32>,
}

/// The result of a greedy generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Tokens generated, without the stop token.
    pub tokens: Vec<u32>,
    /// From the call until the first token was chosen (prefill of the prompt included).
    pub first_token: Duration,
    /// The whole call.
    pub total: Duration,
}

impl LlamaModel {
    /// Loads a Llama GGUF file (weights dequantized to f32).
    pub fn load(path: impl AsRef<Path>) -> Result<LlamaModel, ModelError> {
        let g = gguf::load(path.as_ref())?;
        let tokenizer = Tokenizer::from_spec(g.tokenizer)?;
        Ok(LlamaModel {
            llama: Llama::new(g.config, g.weights)?,
            tokenizer,
        })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.llama.cfg
    }

    /// The tokenizer built from the GGUF.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The kvault namespace of this model's caches: f16 (as the runner's
    /// cache holds them) with the model's RoPE parameters.
    pub fn layout(&self, model_id: &str, chunk_tokens: u32) -> kvault_proto::Layout {
        let c = self.config();
        kvault_proto::Layout {
            model_id: model_id.to_string(),
            layers: c.layers as u32,
            kv_heads: c.kv_heads as u32,
            head_dim: c.head_dim as u32,
            dtype: Dtype::F16,
            chunk_tokens,
            rope: Some(kvault_proto::Rope {
                theta: c.rope_theta,
                rotary_dim: c.head_dim as u32,
            }),
        }
    }

    /// Token ids of a document, refusing an empty one and one longer than
    /// the context (before any work is done).
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let ids = self.tokenizer.encode(text);
        self.check_tokens(0, ids.len())?;
        Ok(ids)
    }

    fn check_tokens(&self, past: usize, new: usize) -> Result<(), ModelError> {
        if new == 0 {
            return Err(ModelError::EmptyInput);
        }
        let context = self.config().context_length;
        if past + new > context {
            return Err(ModelError::TooLong {
                tokens: past + new,
                context,
            });
        }
        Ok(())
    }

    /// Runs `tokens` after the cache `past` (none: from the start) and
    /// returns the KV of past + tokens and the last position's logits.
    pub fn prefill(&self, tokens: &[u32], past: Option<&KvTensor>) -> Result<Prefill, ModelError> {
        let mut s = self.session(past)?;
        let last_logits = s.feed(tokens)?;
        Ok(Prefill {
            kv: s.kv()?,
            last_logits,
        })
    }

    /// A decoding session starting from `past` (none: empty).
    pub fn session(&self, past: Option<&KvTensor>) -> Result<Session<'_>, ModelError> {
        let cache = match past {
            Some(kv) => self.cache_from_kv(kv)?,
            None => KvCache::empty(self.config())?,
        };
        Ok(Session {
            model: self,
            cache,
            remote: None,
        })
    }

    /// A decoding session after `prefix_tokens` positions whose KV stays
    /// elsewhere: their attention comes from `remote` (e.g. kvault servers
    /// holding the prefix) and is merged with the session's own tokens.
    pub fn offloaded_session<'m>(
        &'m self,
        prefix_tokens: usize,
        remote: Box<dyn RemoteAttention + 'm>,
    ) -> Result<Session<'m>, ModelError> {
        if prefix_tokens > self.config().context_length {
            return Err(ModelError::TooLong {
                tokens: prefix_tokens,
                context: self.config().context_length,
            });
        }
        Ok(Session {
            model: self,
            cache: KvCache::after_remote(self.config(), prefix_tokens)?,
            remote: Some(remote),
        })
    }

    /// Greedy continuation of `prompt` after `past`: at most `max_new`
    /// tokens, stopping at a stop token or at the end of the context.
    pub fn generate(
        &self,
        past: Option<&KvTensor>,
        prompt: &[u32],
        max_new: usize,
    ) -> Result<Generation, ModelError> {
        self.session(past)?.generate(prompt, max_new)
    }

    /// Perplexity of `continuation` given the prefix cache `prefix_kv`.
    ///
    /// Scored tokens: `continuation[1..]`, each predicted from the prefix and
    /// the continuation tokens before it. `continuation[0]` is context only:
    /// a KV cache does not carry the prefix's last logits, so nothing here
    /// predicts the first token. Needs at least two tokens.
    pub fn perplexity(&self, prefix_kv: &KvTensor, continuation: &[u32]) -> Result<f64, ModelError> {
        let mut nll = 0.0;
        self.continuation_logits(prefix_kv, continuation, |i, row| {
            nll -= llama::log_prob(row, continuation[i + 1] as usize);
        })?;
        Ok((nll / (continuation.len() - 1) as f64).exp())
    }

    /// Runs `continuation` after the prefix cache `prefix_kv` and calls
    /// `each(i, logits)` with the logits that predict `continuation[i + 1]`,
    /// for every `i < continuation.len() - 1`, in order: what perplexity and
    /// the codec harness's divergences are computed from. Only one step's
    /// logits are held at a time. Needs at least two tokens.
    pub fn continuation_logits(
        &self,
        prefix_kv: &KvTensor,
        continuation: &[u32],
        mut each: impl FnMut(usize, &[f32]),
    ) -> Result<(), ModelError> {
        if continuation.len() < 2 {
            return Err(ModelError::BadInput(
                "scoring needs at least two continuation tokens".into(),
            ));
        }
        let mut s = self.session(Some(prefix_kv))?;
        self.check_tokens(s.len(), continuation.len())?;
        let mut done = 0;
        while done < continuation.len() {
            let room = STEP_TOKENS - s.cache.len % STEP_TOKENS;
            let step = &continuation[done..(done + room).min(continuation.len())];
            let out = self.llama.forward(step, &mut s.cache, Logits::All, None)?;
            let out = out.ok_or_else(|| ModelError::BadInput("no logits".into()))?;
            for (i, row) in llama::rows(&out)?.iter().enumerate() {
                if done + i + 1 < continuation.len() {
                    each(done + i, row);
                }
            }
            done += step.len();
        }
        Ok(())
    }

    /// Turns a canonical KV tensor (any dtype) into the runner's cache.
    pub fn cache_from_kv(&self, kv: &KvTensor) -> Result<KvCache, ModelError> {
        let c = self.config();
        let s = kv.shape();
        if s.layers as usize != c.layers
            || s.kv_heads as usize != c.kv_heads
            || s.head_dim as usize != c.head_dim
        {
            return Err(ModelError::BadKv(format!(
                "{s:?} vs {} layers x {} KV heads x {} dims",
                c.layers, c.kv_heads, c.head_dim
            )));
        }
        let tokens = s.tokens as usize;
        if tokens > c.context_length {
            return Err(ModelError::TooLong {
                tokens,
                context: c.context_length,
            });
        }
        let n = kv.data().len() / kv.dtype().size();
        let mut f32s = vec![0u8; n * 4];
        kvault_codec::convert(kv.data(), kv.dtype(), &mut f32s, Dtype::F32)?;
        let plane = tokens * c.kv_heads * c.head_dim;
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let mut kvp = Vec::with_capacity(2);
            for p in 0..2 {
                let at = (2 * l + p) * plane * 4;
                let vals: Vec<f32> = f32s[at..at + plane * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let t = Tensor::from_vec(vals, (tokens, c.kv_heads, c.head_dim), &Device::Cpu)?
                    .transpose(0, 1)?
                    .contiguous()?;
                kvp.push(t);
            }
            let v = kvp.pop();
            let k = kvp.pop();
            if let (Some(k), Some(v)) = (k, v) {
                layers.push((k, v));
            }
        }
        Ok(KvCache {
            layers,
            len: tokens,
            remote: 0,
        })
    }

    /// The runner's cache as a canonical f32 KV tensor.
    pub fn cache_to_kv(&self, cache: &KvCache) -> Result<KvTensor, ModelError> {
        self.cache_range_to_kv(cache, 0, cache.len)
    }

    /// Tokens `t0..t1` of the runner's cache as a canonical f32 KV tensor
    /// (one chunk of a prefix, for storing).
    pub fn cache_range_to_kv(&self, cache: &KvCache, t0: usize, t1: usize) -> Result<KvTensor, ModelError> {
        if cache.remote > 0 {
            return Err(ModelError::BadInput(format!(
                "the cache's first {} positions are held remotely; only local tokens can be read out",
                cache.remote
            )));
        }
        if t0 > t1 || t1 > cache.len {
            return Err(ModelError::BadInput(format!(
                "token range {t0}..{t1} outside the cache of {}",
                cache.len
            )));
        }
        let c = self.config();
        let shape = KvShape {
            layers: c.layers as u32,
            tokens: (t1 - t0) as u32,
            kv_heads: c.kv_heads as u32,
            head_dim: c.head_dim as u32,
        };
        let mut data = Vec::with_capacity(shape.byte_len(Dtype::F32)?);
        for (k, v) in &cache.layers {
            for t in [k, v] {
                let vals = t
                    .narrow(1, t0, t1 - t0)?
                    .transpose(0, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                data.extend(vals.iter().flat_map(|x| x.to_le_bytes()));
            }
        }
        Ok(KvTensor::new(shape, Dtype::F32, data)?)
    }
}

/// A decoding session: a KV cache plus the model, fed token by token or in
/// steps.
pub struct Session<'m> {
    model: &'m LlamaModel,
    cache: KvCache,
    remote: Option<Box<dyn RemoteAttention + 'm>>,
}

impl Session<'_> {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.cache.len
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.cache.len == 0
    }

    /// Runs `tokens` and returns the logits after the last one.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.model.check_tokens(self.cache.len, tokens.len())?;
        let remote = self.remote.as_deref_mut().map(|r| r as &mut dyn RemoteAttention);
        let out = self
            .model
            .llama
            .forward(tokens, &mut self.cache, Logits::Last, remote)?;
        let out = out.ok_or_else(|| ModelError::BadInput("no logits".into()))?;
        llama::rows(&out)?
            .pop()
            .ok_or_else(|| ModelError::BadInput("no logits".into()))
    }

    /// The cache as a canonical f32 KV tensor.
    pub fn kv(&self) -> Result<KvTensor, ModelError> {
        self.model.cache_to_kv(&self.cache)
    }

    /// Tokens `t0..t1` of the cache as a canonical f32 KV tensor.
    pub fn kv_range(&self, t0: usize, t1: usize) -> Result<KvTensor, ModelError> {
        self.model.cache_range_to_kv(&self.cache, t0, t1)
    }

    /// Greedy continuation of `prompt`: at most `max_new` tokens, stopping
    /// at a stop token or when the context is full.
    pub fn generate(&mut self, prompt: &[u32], max_new: usize) -> Result<Generation, ModelError> {
        let t0 = Instant::now();
        let mut logits = self.feed(prompt)?;
        let mut tokens = Vec::new();
        let mut first_token = None;
        let context = self.model.config().context_length;
        while tokens.len() < max_new {
            let next = llama::argmax(&logits);
            first_token.get_or_insert_with(|| t0.elapsed());
            if self.model.tokenizer.stop_ids().contains(&next) {
                break;
            }
            tokens.push(next);
            if tokens.len() == max_new || self.cache.len >= context {
                break;
            }
            logits = self.feed(&[next])?;
        }
        Ok(Generation {
            tokens,
            first_token: first_token.unwrap_or_else(|| t0.elapsed()),
            total: t0.elapsed(),
        })
    }
}

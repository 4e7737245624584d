//! `kvault codec-eval`: what each codec profile costs in model quality, on real KV caches.
//!
//! For each input text: cut it into windows of `--prefix-tokens` + `--cont-tokens` tokens
//! (up to `--windows` per text, back to back from the start), prefill each window's prefix
//! with the model runner, cut the KV cache into `--chunk-tokens` chunks as the store would,
//! encode and decode every chunk with each profile, and score the window's continuation
//! with the decoded cache injected against the same continuation after the original cache.
//!
//! Two quality measures, both over every scored continuation token:
//! - **Δppl**: the perplexity with the decoded cache against the one with the original
//!   (pooled over all tokens: `exp(mean ΔNLL) - 1`). It is what the goals name, but
//!   it is a difference of two noisy sums: a codec error can make some tokens more likely
//!   and others less, so per text it swings by several percent either way.
//! - **KL**: the mean Kullback-Leibler divergence `KL(p_original || p_decoded)` of the
//!   next-token distributions, in nats per token. It is never negative, zero only for an
//!   identical distribution, and measures the whole distribution rather than the one
//!   token that happened to follow, so it separates profiles with far fewer tokens.
//!
//! Both are given with ± two standard errors over windows (windows are the independent
//! unit: tokens within one share their prefix). Also printed: bytes, ratio against fp16,
//! bits per element, relative L2 error of K and of V, and how often the most likely next
//! token is unchanged.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use kvault_client::model::LlamaModel;
use kvault_client::prefix::{place_tokens, slice_tokens};
use kvault_codec::{Dtype, KvTensor, KvTuning, Profile};

#[derive(Debug, Args)]
pub struct CodecEvalArgs {
    /// GGUF model (Llama architecture).
    #[arg(long, default_value = ".models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Text files to evaluate on (each gives its own rows).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Tokens of each window's prefix, whose KV cache is coded (fewer if a text is short).
    #[arg(long, default_value_t = 512)]
    pub prefix_tokens: usize,
    /// Tokens of each window's continuation, scored after the prefix.
    #[arg(long, default_value_t = 256)]
    pub cont_tokens: usize,
    /// Windows per text at most (back to back from the start; a text gives as many as fit).
    #[arg(long, default_value_t = 1)]
    pub windows: usize,
    /// Tokens per stored chunk (each chunk is its own container).
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: u32,
    /// Profiles to evaluate, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub profiles: Vec<Profile>,
    /// Extra rows: the `kv-mid` encoder with other step factors,
    /// `KEY,VALUE[,EARLY[,KEY_POWER[,VALUE_POWER[,KEY_ROWS[,ROW_STEPS[,ROWS_FROM[,SINKS[,SINK_VALUES[,PREDICT]]]]]]]]]]`
    /// (key and value step factors in units of σ, factor multiplier of the early layer
    /// group, how steps follow each group's own σ, tokens per row of key groups (0: none),
    /// 1 for a key step per row or 0 for one pooled over rows, the shortest chunk coded
    /// with rows, the leading tokens of a window whose keys are stored exactly, 1 to store
    /// their values exactly too, 1 to predict residuals from the previous token's: see
    /// `kvault_codec::KvTuning`); omitted
    /// fields are kv-mid's. Repeatable. For rate-distortion experiments: the containers
    /// decode with the same decoders.
    #[arg(long, value_parser = parse_tuning)]
    pub tune: Vec<KvTuning>,
    /// Folder that keeps each window's prefilled cache, so that a later run on the same
    /// model and windows skips the prefill (for tuning sweeps).
    #[arg(long)]
    pub kv_cache: Option<PathBuf>,
}

fn parse_tuning(s: &str) -> Result<KvTuning, String> {
    let f: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>().map_err(|e| format!("{x:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let mut t = KvTuning::of(Profile::DEFAULT_LOSSY).ok_or("no default kv tuning")?;
    if !(2..=11).contains(&f.len()) {
        return Err(format!(
            "{s:?}: expected KEY,VALUE[,EARLY[,KEY_POWER[,VALUE_POWER[,KEY_ROWS[,ROW_STEPS[,ROWS_FROM[,SINKS[,SINK_VALUES[,PREDICT]]]]]]]]]]"
        ));
    }
    (t.key_factor, t.value_factor) = (f[0], f[1]);
    if let Some(&e) = f.get(2) {
        t.early_scale = e;
    }
    if let Some(&p) = f.get(3) {
        t.key_power = p;
    }
    if let Some(&p) = f.get(4) {
        t.value_power = p;
    }
    // A whole number of at most `max`, or a 0/1 switch, at field `i`.
    let whole = |i: usize, max: f64, what: &str| -> Result<Option<u32>, String> {
        match f.get(i) {
            Some(&v) if !(0.0..=max).contains(&v) || v.fract() != 0.0 => {
                Err(format!("{s:?}: {what} up to {max}"))
            }
            v => Ok(v.map(|&v| v as u32)),
        }
    };
    let switch = |i: usize, what: &str| -> Result<Option<bool>, String> {
        match f.get(i) {
            None => Ok(None),
            Some(0.0) => Ok(Some(false)),
            Some(1.0) => Ok(Some(true)),
            Some(_) => Err(format!("{s:?}: {what} must be 0 or 1")),
        }
    };
    if let Some(r) = whole(5, 65535.0, "KEY_ROWS must be a whole number of tokens")? {
        t.key_group_tokens = r;
    }
    if let Some(b) = switch(6, "ROW_STEPS")? {
        t.key_step_per_row = b;
    }
    if let Some(r) = whole(7, 65535.0, "ROWS_FROM must be a whole number of tokens")? {
        t.key_rows_min_tokens = r;
    }
    if let Some(n) = whole(8, 64.0, "SINKS must be a whole number of tokens")? {
        t.sink_tokens = n;
    }
    if let Some(b) = switch(9, "SINK_VALUES")? {
        t.sink_values = b;
    }
    if let Some(b) = switch(10, "PREDICT")? {
        t.predict = b;
    }
    Ok(t)
}

/// What a row of the table encodes with: a profile, or the `kv-*` encoder with a tuning.
#[derive(Clone, Debug)]
pub(super) enum Variant {
    Profile(Profile),
    Tuned(KvTuning),
}

impl Variant {
    /// The variants of a run: the profiles (all when none is named), then the tunings.
    pub(super) fn list(profiles: &[Profile], tunings: &[KvTuning]) -> Vec<Variant> {
        let profiles = if profiles.is_empty() {
            Profile::ALL
        } else {
            profiles
        };
        profiles
            .iter()
            .map(|&p| Variant::Profile(p))
            .chain(tunings.iter().cloned().map(Variant::Tuned))
            .collect()
    }

    pub(super) fn profile(&self) -> Option<Profile> {
        match self {
            Variant::Profile(p) => Some(*p),
            Variant::Tuned(_) => None,
        }
    }

    /// Encodes a chunk; `starts_sequence` for a window's first (its sink token).
    fn encode(
        &self,
        view: kvault_codec::KvView<'_>,
        starts_sequence: bool,
    ) -> Result<Vec<u8>, kvault_codec::CodecError> {
        let (profile, tuning) = match self {
            Variant::Profile(p) => (*p, None),
            Variant::Tuned(t) => (Profile::DEFAULT_LOSSY, Some(t)),
        };
        let options = kvault_codec::EncodeOptions {
            tuning,
            starts_sequence,
        };
        kvault_codec::encode_with(view, profile, options)
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Profile(p) => write!(f, "{p}"),
            Variant::Tuned(t) => write!(
                f,
                "tuned k{} v{} e{} kp{} vp{} rows{}{}{}{}",
                t.key_factor,
                t.value_factor,
                t.early_scale,
                t.key_power,
                t.value_power,
                t.key_group_tokens,
                if t.key_step_per_row { "" } else { "p" },
                if t.key_rows_min_tokens == kvault_codec::profile::KEY_ROWS_MIN_TOKENS {
                    String::new()
                } else {
                    format!(" from{}", t.key_rows_min_tokens)
                },
                match KvTuning::of(Profile::DEFAULT_LOSSY) {
                    Some(d) if (d.sink_tokens, d.sink_values) == (t.sink_tokens, t.sink_values) =>
                        String::new(),
                    _ => format!(
                        " sinks{}{}",
                        t.sink_tokens,
                        if t.sink_values { "kv" } else { "k" }
                    ),
                }
            ),
        }
    }
}

/// A real prefix: its KV cache in f16 (the runner rounds K/V to f16, so this is exact)
/// and the continuation after it.
pub(super) struct RealKv {
    pub kv: KvTensor,
    pub continuation: Vec<u32>,
}

/// Token windows `(prefix, continuation)` of `text`: up to `max` back to back from the
/// start, each `prefix_tokens + cont_tokens` long. A text too short for one full window
/// gives one with a shorter prefix (at least 16 tokens).
pub(super) fn windows(
    model: &LlamaModel,
    text: &str,
    prefix_tokens: usize,
    cont_tokens: usize,
    max: usize,
) -> anyhow::Result<Vec<(Vec<u32>, Vec<u32>)>> {
    // Not `encode_document`: that refuses texts longer than the context, and only the
    // first windows are used.
    let ids = model.tokenizer().encode(text);
    let span = prefix_tokens + cont_tokens;
    if ids.len() < cont_tokens + 16 {
        bail!(
            "text has {} tokens, need at least {}",
            ids.len(),
            cont_tokens + 16
        );
    }
    if ids.len() < span {
        let prefix = ids.len() - cont_tokens;
        return Ok(vec![(ids[..prefix].to_vec(), ids[prefix..].to_vec())]);
    }
    Ok(ids
        .chunks_exact(span)
        .take(max.max(1))
        .map(|w| (w[..prefix_tokens].to_vec(), w[prefix_tokens..].to_vec()))
        .collect())
}

/// Prefills `prefix` and returns its KV cache in f16 with `continuation` beside it. With
/// `cache`, a prefill of the same model and prefix done before is read from that folder
/// instead (and a new one written there): prefill dominates the time of a tuning sweep.
pub(super) fn real_kv(
    model: &LlamaModel,
    model_path: &Path,
    prefix: &[u32],
    continuation: &[u32],
    cache: Option<&Path>,
) -> anyhow::Result<RealKv> {
    let file = cache.map(|dir| {
        let mut h = blake3::Hasher::new();
        h.update(model_path.as_os_str().as_encoded_bytes());
        for t in prefix {
            h.update(&t.to_le_bytes());
        }
        dir.join(format!("{}.safetensors", &h.finalize().to_hex()[..32]))
    });
    if let Some(f) = file.as_ref().filter(|f| f.exists()) {
        let got = kvault_client::kv_file::read(f)?;
        if got.ids == prefix && got.kv.dtype() == Dtype::F16 {
            return Ok(RealKv {
                kv: got.kv,
                continuation: continuation.to_vec(),
            });
        }
    }
    let pre = model.prefill(prefix, None)?;
    let mut kv = KvTensor::zeros(pre.kv.shape(), Dtype::F16)?;
    kvault_codec::convert(pre.kv.data(), pre.kv.dtype(), kv.data_mut(), Dtype::F16)?;
    if let Some(f) = &file {
        if let Some(dir) = f.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        kvault_client::kv_file::write(f, &kv, prefix)?;
    }
    Ok(RealKv {
        kv,
        continuation: continuation.to_vec(),
    })
}

/// Encodes `kv` in chunks of `chunk_tokens` tokens with `variant`: the containers.
pub(super) fn encode_chunks(
    kv: &KvTensor,
    variant: &Variant,
    chunk_tokens: u32,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let t = kv.shape().tokens;
    (0..t)
        .step_by(chunk_tokens as usize)
        .map(|t0| {
            let chunk = slice_tokens(&kv.view(), t0, (t0 + chunk_tokens).min(t))?;
            Ok(variant.encode(chunk.view(), t0 == 0)?)
        })
        .collect()
}

/// Decodes chunk containers back into one f32 tensor of `kv`'s shape.
pub(super) fn decode_chunks(kv: &KvTensor, blobs: &[Vec<u8>], chunk_tokens: u32) -> anyhow::Result<KvTensor> {
    let mut out = KvTensor::zeros(kv.shape(), Dtype::F32)?;
    for (i, blob) in blobs.iter().enumerate() {
        let shape = kvault_codec::Container::parse(blob)?.header().shape();
        let mut f = KvTensor::zeros(shape, Dtype::F32)?;
        kvault_codec::decode_into(blob, Dtype::F32, f.data_mut())?;
        place_tokens(&mut out, &f.view(), i as u32 * chunk_tokens)?;
    }
    Ok(out)
}

/// Squared error and squared norm of K and of V (`x` any dtype, `y` f32), for relative L2
/// errors pooled over windows.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct L2 {
    err: [f64; 2],
    norm: [f64; 2],
}

impl L2 {
    /// Adds the errors of decoded `y` against original `x`.
    pub(super) fn add(&mut self, x: &KvTensor, y: &KvTensor) -> anyhow::Result<()> {
        let mut xf = vec![0u8; x.shape().byte_len(Dtype::F32)?];
        kvault_codec::convert(x.data(), x.dtype(), &mut xf, Dtype::F32)?;
        let f = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (xs, ys) = (f(&xf), f(y.data()));
        let part = (x.shape().tokens * x.shape().kv_heads * x.shape().head_dim) as usize;
        for (i, (a, b)) in xs.chunks_exact(part).zip(ys.chunks_exact(part)).enumerate() {
            for (&p, &q) in a.iter().zip(b) {
                self.err[i % 2] += f64::from(p - q).powi(2);
                self.norm[i % 2] += f64::from(p).powi(2);
            }
        }
        Ok(())
    }

    /// Relative L2 error `||x - y|| / ||x||` of K and of V.
    pub(super) fn rel(&self) -> (f64, f64) {
        let r = |i: usize| (self.err[i] / self.norm[i].max(f64::MIN_POSITIVE)).sqrt();
        (r(0), r(1))
    }
}

/// The original cache's next-token distributions over one window's continuation.
pub(super) struct Reference {
    /// Log-probabilities, one row of `vocab` per scored token.
    log_probs: Vec<f32>,
    vocab: usize,
    /// The tokens scored: `continuation[1..]`.
    targets: Vec<u32>,
}

/// Natural-log softmax of `row` into `out` (replacing it), in f64 internally.
fn log_softmax(row: &[f32], out: &mut Vec<f32>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&l| (f64::from(l) - max).exp()).sum::<f64>().ln();
    out.clear();
    out.extend(row.iter().map(|&l| (f64::from(l) - lse) as f32));
}

impl Reference {
    /// Scores `real`'s continuation after its original cache.
    pub(super) fn new(model: &LlamaModel, real: &RealKv) -> anyhow::Result<Reference> {
        let mut log_probs = Vec::new();
        let mut row_lp = Vec::new();
        let mut vocab = 0;
        model.continuation_logits(&real.kv, &real.continuation, |_, row| {
            vocab = row.len();
            log_softmax(row, &mut row_lp);
            log_probs.extend_from_slice(&row_lp);
        })?;
        Ok(Reference {
            log_probs,
            vocab,
            targets: real.continuation[1..].to_vec(),
        })
    }

    /// Scores the continuation after `kv` (a decoded cache) against this reference.
    pub(super) fn score(
        &self,
        model: &LlamaModel,
        kv: &KvTensor,
        continuation: &[u32],
    ) -> anyhow::Result<Quality> {
        let mut q = Quality::default();
        let mut lp = Vec::new();
        let mut bad = None;
        model.continuation_logits(kv, continuation, |i, row| {
            let Some(reference) = self.log_probs.get(i * self.vocab..(i + 1) * self.vocab) else {
                bad = Some(i);
                return;
            };
            if row.len() != self.vocab {
                bad = Some(i);
                return;
            }
            log_softmax(row, &mut lp);
            let target = self.targets[i] as usize;
            q.tokens += 1;
            q.nll_ref -= f64::from(reference[target]);
            q.nll -= f64::from(lp[target]);
            q.kl += reference
                .iter()
                .zip(&lp)
                .map(|(&r, &d)| f64::from(r).exp() * (f64::from(r) - f64::from(d)))
                .sum::<f64>();
            q.top1_same += usize::from(argmax(reference) == argmax(&lp));
        })?;
        if let Some(i) = bad {
            bail!("scored position {i} does not match the reference");
        }
        Ok(q)
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Sums over the scored tokens of one or more windows.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Quality {
    tokens: usize,
    /// Negative log-likelihood with the original cache (nats).
    nll_ref: f64,
    /// Negative log-likelihood with the decoded cache (nats).
    nll: f64,
    /// Σ KL(p_original || p_decoded) (nats).
    kl: f64,
    /// Tokens whose most likely next token is unchanged.
    top1_same: usize,
}

impl Quality {
    fn add(&mut self, o: &Quality) {
        self.tokens += o.tokens;
        self.nll_ref += o.nll_ref;
        self.nll += o.nll;
        self.kl += o.kl;
        self.top1_same += o.top1_same;
    }

    fn n(&self) -> f64 {
        self.tokens.max(1) as f64
    }

    /// Tokens scored.
    pub(super) fn tokens_scored(&self) -> usize {
        self.tokens
    }

    /// Mean ΔNLL per token (nats).
    fn dnll(&self) -> f64 {
        (self.nll - self.nll_ref) / self.n()
    }

    /// Relative perplexity change, pooled.
    pub(super) fn dppl(&self) -> f64 {
        self.dnll().exp_m1()
    }

    /// Original perplexity, pooled.
    pub(super) fn ppl_ref(&self) -> f64 {
        (self.nll_ref / self.n()).exp()
    }

    /// Mean KL per token (nats).
    pub(super) fn kl(&self) -> f64 {
        self.kl / self.n()
    }

    fn top1(&self) -> f64 {
        self.top1_same as f64 / self.n()
    }
}

/// Quality over several windows, kept per window for the standard errors.
#[derive(Clone, Debug, Default)]
pub(super) struct Windows {
    each: Vec<Quality>,
}

impl Windows {
    pub(super) fn push(&mut self, q: Quality) {
        self.each.push(q);
    }

    pub(super) fn total(&self) -> Quality {
        let mut t = Quality::default();
        for q in &self.each {
            t.add(q);
        }
        t
    }

    /// Two standard errors over windows of a per-window statistic, or `None` with fewer
    /// than two windows.
    fn two_se(&self, f: impl Fn(&Quality) -> f64) -> Option<f64> {
        let n = self.each.len();
        if n < 2 {
            return None;
        }
        let xs: Vec<f64> = self.each.iter().map(f).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        Some(2.0 * (var / n as f64).sqrt())
    }

    /// `Δppl ± 2 SE` as a table cell (the SE of the mean ΔNLL, which is Δppl's to first order).
    pub(super) fn dppl_cell(&self) -> String {
        let t = self.total();
        match self.two_se(Quality::dnll) {
            Some(se) => format!("{:+.3}% ± {:.3}%", 100.0 * t.dppl(), 100.0 * se),
            None => format!("{:+.3}%", 100.0 * t.dppl()),
        }
    }

    /// `KL ± 2 SE` (nats per token) as a table cell.
    pub(super) fn kl_cell(&self) -> String {
        let t = self.total();
        match self.two_se(Quality::kl) {
            Some(se) => format!("{:.5} ± {:.5}", t.kl(), se),
            None => format!("{:.5}", t.kl()),
        }
    }

    /// Share of tokens whose most likely next token is unchanged, as a table cell.
    pub(super) fn top1_cell(&self) -> String {
        format!("{:.2}%", 100.0 * self.total().top1())
    }
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Per profile, accumulated over texts and windows.
#[derive(Clone, Debug, Default)]
struct Totals {
    bytes: usize,
    fp16: usize,
    l2: L2,
    quality: Windows,
}

pub fn run(a: CodecEvalArgs) -> anyhow::Result<()> {
    let model = LlamaModel::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let profiles = Variant::list(&a.profiles, &a.tune);
    println!(
        "model {}, chunks of {} tokens, windows of {} + {} tokens (at most {} per text)",
        a.model.display(),
        a.chunk_tokens,
        a.prefix_tokens,
        a.cont_tokens,
        a.windows
    );
    println!(
        "| text | windows | scored | profile | ratio vs fp16 | bits/elem | rel L2 K | rel L2 V | ppl | Δppl | KL nats/token | top-1 same |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut totals = vec![Totals::default(); profiles.len()];
    for path in &a.input {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = file_name(path);
        let wins = windows(&model, &text, a.prefix_tokens, a.cont_tokens, a.windows)
            .with_context(|| name.clone())?;
        let mut per_text = vec![Totals::default(); profiles.len()];
        for (prefix, cont) in &wins {
            let real = real_kv(&model, &a.model, prefix, cont, a.kv_cache.as_deref())
                .with_context(|| name.clone())?;
            let reference = Reference::new(&model, &real)?;
            for (p, tot) in profiles.iter().zip(per_text.iter_mut()) {
                let blobs = encode_chunks(&real.kv, p, a.chunk_tokens)?;
                tot.bytes += blobs.iter().map(Vec::len).sum::<usize>();
                tot.fp16 += real.kv.data().len();
                let back = decode_chunks(&real.kv, &blobs, a.chunk_tokens)?;
                tot.l2.add(&real.kv, &back)?;
                tot.quality
                    .push(reference.score(&model, &back, &real.continuation)?);
            }
        }
        for (p, (t, all)) in profiles.iter().zip(per_text.iter().zip(totals.iter_mut())) {
            let (ek, ev) = t.l2.rel();
            let q = t.quality.total();
            println!(
                "| {name} | {} | {} | {p} | {:.2}x | {:.3} | {ek:.4} | {ev:.4} | {:.4} | {} | {} | {} |",
                wins.len(),
                q.tokens,
                t.fp16 as f64 / t.bytes as f64,
                t.bytes as f64 * 16.0 / t.fp16 as f64,
                q.ppl_ref(),
                t.quality.dppl_cell(),
                t.quality.kl_cell(),
                t.quality.top1_cell(),
            );
            all.bytes += t.bytes;
            all.fp16 += t.fp16;
            all.l2.err.iter_mut().zip(t.l2.err).for_each(|(a, b)| *a += b);
            all.l2.norm.iter_mut().zip(t.l2.norm).for_each(|(a, b)| *a += b);
            for w in &t.quality.each {
                all.quality.push(*w);
            }
        }
    }
    println!();
    println!("All texts (Δppl pooled over every scored token; ± two standard errors over windows):");
    println!();
    println!(
        "| profile | windows | scored | ratio vs fp16 | bits/elem | rel L2 K | rel L2 V | Δppl | KL nats/token | top-1 same |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (p, t) in profiles.iter().zip(&totals) {
        let (ek, ev) = t.l2.rel();
        println!(
            "| {p} | {} | {} | {:.2}x | {:.3} | {ek:.4} | {ev:.4} | {} | {} | {} |",
            t.quality.each.len(),
            t.quality.total().tokens,
            t.fp16 as f64 / t.bytes.max(1) as f64,
            t.bytes as f64 * 16.0 / t.fp16.max(1) as f64,
            t.quality.dppl_cell(),
            t.quality.kl_cell(),
            t.quality.top1_cell(),
        );
    }
    Ok(())
}

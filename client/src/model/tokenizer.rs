//! Byte-level BPE tokenizer built from a GGUF's own metadata
//! (`tokenizer.ggml.tokens`, `.merges`, `.token_type`, `.pre`), giving the
//! same ids as the model's reference tokenizer (HF `tokenizers`).
//!
//! Encoding is three steps, as in HF: special (control) tokens are cut out of
//! the text first; the rest is split by the pre-tokenizer named in
//! `tokenizer.ggml.pre`; each piece is mapped to GPT-2's printable byte
//! alphabet and merged by rank.

use std::collections::HashMap;

use fancy_regex::Regex;

use super::ModelError;

/// GPT-2's split pattern (HF's `ByteLevel` with `use_regex`). The lookahead in
/// `\s+(?!\S)` leaves the last space of a run to the next word, which the
/// plain `regex` crate cannot express.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama-3's split pattern (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token type of control tokens (`<|im_start|>`…), matched literally.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of user-defined added tokens, also matched literally.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// What the GGUF says about its tokenizer.
#[derive(Debug, Clone)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`; only `gpt2` (byte-level BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.pre`: names the pre-tokenizer.
    pub pre: String,
    /// Token strings, by id.
    pub tokens: Vec<String>,
    /// Token types, by id (empty when the GGUF has none).
    pub token_types: Vec<i32>,
    /// Merges `"a b"`, by rank.
    pub merges: Vec<String>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
}

/// A byte-level BPE tokenizer.
#[derive(Debug)]
pub struct Tokenizer {
    tokens: Vec<String>,
    vocab: HashMap<String, u32>,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Control tokens, longest first, matched before pre-tokenizing.
    specials: Vec<(String, u32)>,
    split: Regex,
    isolate_digits: bool,
    char_byte: HashMap<char, u8>,
    /// Id of each byte's single-character token; `None` for bytes the
    /// vocabulary lacks (SmolLM2's lacks a few control bytes).
    byte_id: [Option<u32>; 256],
    eos: Option<u32>,
    stops: Vec<u32>,
}

/// GPT-2's map of bytes to printable characters (printable Latin-1 bytes map
/// to themselves, the others to U+0100 onwards).
fn bytes_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        // Every value is below 0x200, a valid scalar value.
        out[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    out
}

impl Tokenizer {
    /// Builds the tokenizer from the GGUF's metadata.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Tokenizer, ModelError> {
        let bad = |r: String| ModelError::Tokenizer(r);
        if spec.model != "gpt2" {
            return Err(bad(format!(
                "tokenizer model {:?} is not supported (only byte-level BPE, \"gpt2\")",
                spec.model
            )));
        }
        // The pre-tokenizers of llama.cpp's `llama-vocab.cpp`, by name.
        let (pattern, isolate_digits) = match spec.pre.as_str() {
            "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" => (GPT2_PATTERN, true),
            "gpt-2" | "gpt2" | "default" | "" => (GPT2_PATTERN, false),
            "llama-bpe" | "llama3" => (LLAMA3_PATTERN, false),
            other => return Err(bad(format!("pre-tokenizer {other:?} is not supported"))),
        };
        let split = Regex::new(pattern).map_err(|e| bad(format!("split pattern: {e}")))?;
        let vocab: HashMap<String, u32> = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let byte_char = bytes_to_unicode();
        let char_byte = byte_char.iter().enumerate().map(|(b, c)| (*c, b as u8)).collect();
        let mut byte_id = [None; 256];
        for (b, c) in byte_char.iter().enumerate() {
            byte_id[b] = vocab.get(&c.to_string()).copied();
        }
        let mut merges = HashMap::with_capacity(spec.merges.len());
        for (rank, m) in spec.merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| bad(format!("merge {rank} {m:?} is not \"a b\"")))?;
            let id = |s: &str| {
                vocab
                    .get(s)
                    .copied()
                    .ok_or_else(|| bad(format!("merge {rank} {m:?} names unknown token {s:?}")))
            };
            let merged = id(&format!("{a}{b}"))?;
            merges.entry((id(a)?, id(b)?)).or_insert((rank as u32, merged));
        }
        let mut specials: Vec<(String, u32)> = spec
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .filter_map(|(i, _)| spec.tokens.get(i).map(|s| (s.clone(), i as u32)))
            .filter(|(s, _)| !s.is_empty())
            .collect();
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let mut stops: Vec<u32> = spec.eos.into_iter().collect();
        for name in ["<|endoftext|>", "<|im_end|>", "<|eot_id|>"] {
            if let Some(id) = vocab.get(name)
                && !stops.contains(id)
            {
                stops.push(*id);
            }
        }
        Ok(Tokenizer {
            tokens: spec.tokens,
            vocab,
            merges,
            specials,
            split,
            isolate_digits,
            char_byte,
            byte_id,
            eos: spec.eos,
            stops,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// End-of-sequence id, when the GGUF names one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Ids that end a generation (EOS and the chat end-of-turn tokens).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stops
    }

    /// Id of a token given by its exact string (e.g. `<|im_start|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Token ids of `text`. Control tokens written in the text (e.g.
    /// `<|im_start|>`) become their ids, as in HF `tokenizers`. No BOS is added.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut rest = text;
        while !rest.is_empty() {
            match self.next_special(rest) {
                Some((at, s, id)) => {
                    self.encode_plain(&rest[..at], &mut out);
                    out.push(id);
                    rest = &rest[at + s.len()..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    /// The earliest control token in `text` (longest at that position).
    fn next_special(&self, text: &str) -> Option<(usize, &str, u32)> {
        let mut best: Option<(usize, &str, u32)> = None;
        for (s, id) in &self.specials {
            if let Some(at) = text.find(s.as_str())
                && best.is_none_or(|(b, bs, _)| at < b || (at == b && s.len() > bs.len()))
            {
                best = Some((at, s.as_str(), *id));
            }
        }
        best
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if !self.isolate_digits {
            self.encode_split(text, out);
            return;
        }
        // HF `Digits(individual_digits)`: every numeric char is a piece alone.
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.encode_split(&text[start..i], out);
                self.encode_split(&text[i..i + c.len_utf8()], out);
                start = i + c.len_utf8();
            }
        }
        self.encode_split(&text[start..], out);
    }

    fn encode_split(&self, text: &str, out: &mut Vec<u32>) {
        let mut pos = 0;
        while pos < text.len() {
            // The pattern ends in `\s+` and covers every other char class, so
            // it always matches at `pos`; a regex engine error (backtrack
            // limit) falls back to the rest of the text as one word.
            let end = match self.split.find_from_pos(text, pos) {
                Ok(Some(m)) if m.start() == pos && m.end() > pos => m.end(),
                Ok(Some(m)) if m.start() > pos => m.start(),
                _ => text.len(),
            };
            self.bpe(&text[pos..end], out);
            pos = end;
        }
    }

    /// Merges one pre-token by rank. Hot path for long documents, but
    /// pre-tokens are short, so the quadratic scan is cheap.
    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        // A byte without a token is dropped, as HF's BPE does without an
        // unknown token; its neighbours then meet and may merge.
        let mut ids: Vec<u32> = word.bytes().filter_map(|b| self.byte_id[b as usize]).collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..ids.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(ids[i], ids[i + 1]))
                    && best.is_none_or(|(r, _, _)| rank < r)
                {
                    best = Some((rank, i, merged));
                }
            }
            let Some((_, i, merged)) = best else { break };
            ids[i] = merged;
            ids.remove(i + 1);
        }
        out.extend_from_slice(&ids);
    }

    /// Text of `ids`; control tokens come out as their names.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for id in ids {
            let Some(tok) = self.tokens.get(*id as usize) else {
                continue;
            };
            for c in tok.chars() {
                match self.char_byte.get(&c) {
                    Some(b) => bytes.push(*b),
                    None => {
                        let mut buf = [0u8; 4];
                        bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: every byte, plus "ab", "abc", "Ġa".
    fn toy() -> Tokenizer {
        let map = bytes_to_unicode();
        let mut tokens: Vec<String> = vec!["<|end|>".into()];
        tokens.extend(map.iter().map(|c| c.to_string()));
        tokens.extend(["ab".into(), "abc".into(), "Ġa".into()]);
        let mut token_types = vec![1; tokens.len()];
        token_types[0] = TOKEN_TYPE_CONTROL;
        Tokenizer::from_spec(TokenizerSpec {
            model: "gpt2".into(),
            pre: "smollm".into(),
            tokens,
            token_types,
            merges: vec!["a b".into(), "ab c".into(), "Ġ a".into()],
            eos: Some(0),
        })
        .expect("toy tokenizer")
    }

    #[test]
    fn merges_by_rank_and_round_trips() {
        let t = toy();
        let ab = t.token_id("ab").unwrap();
        let abc = t.token_id("abc").unwrap();
        let ga = t.token_id("Ġa").unwrap();
        assert_eq!(t.encode("abc"), vec![abc]);
        assert_eq!(t.encode("abab"), vec![ab, ab]);
        assert_eq!(t.encode(" a"), vec![ga]);
        for s in ["abc ab 12 x\n\n  y", "héllo wörld ✓", "<|end|>ab<|end|>"] {
            assert_eq!(t.decode(&t.encode(s)), s);
        }
        assert_eq!(t.encode("<|end|>")[..], [0]);
    }

    #[test]
    fn digits_are_isolated() {
        let t = toy();
        let one = t.byte_id[b'1' as usize].unwrap();
        let two = t.byte_id[b'2' as usize].unwrap();
        assert_eq!(t.encode("12"), vec![one, two]);
    }

    #[test]
    fn refuses_unknown_model_and_pre() {
        let spec = TokenizerSpec {
            model: "llama".into(),
            pre: "smollm".into(),
            tokens: vec![],
            token_types: vec![],
            merges: vec![],
            eos: None,
        };
        assert!(Tokenizer::from_spec(spec.clone()).is_err());
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: "mystery".into(),
            ..spec
        };
        assert!(Tokenizer::from_spec(spec).is_err());
    }
}

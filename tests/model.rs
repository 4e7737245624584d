//! The model runner on the real SmolLM2-135M GGUF (fetched by
//! `scripts/fetch-model.sh`): tokenizer ids and forward results against
//! independent references (fixtures made by the scripts in
//! `tests/fixtures/`), continuation from an injected cache, bad inputs.

use std::sync::OnceLock;

use kvault_client::model::{LlamaModel, ModelError};
use kvault_codec::{Dtype, KvTensor, Profile};
use kvault_tests::model_path;

fn model() -> &'static LlamaModel {
    static MODEL: OnceLock<LlamaModel> = OnceLock::new();
    MODEL.get_or_init(|| LlamaModel::load(model_path()).expect("load SmolLM2 GGUF"))
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

#[derive(serde::Deserialize)]
struct TokCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

/// Ids equal those of HF `tokenizers` (tests/fixtures/make_tokenizer_ids.py).
#[test]
fn tokenizer_matches_reference_ids() {
    let raw = std::fs::read_to_string(fixture("tokenizer_ids.json")).expect("fixture");
    let cases: Vec<TokCase> = serde_json::from_str(&raw).expect("fixture json");
    assert!(cases.len() >= 20);
    assert!(cases.iter().filter(|c| c.decoded == c.text).count() >= 20);
    let tok = model().tokenizer();
    let mut bad = Vec::new();
    for c in &cases {
        let got = tok.encode(&c.text);
        if got != c.ids {
            bad.push(format!("{:?}\n  want {:?}\n  got  {:?}", c.text, c.ids, got));
        }
        assert_eq!(tok.decode(&c.ids), c.decoded, "decode of {:?}", c.text);
    }
    assert!(bad.is_empty(), "tokenizer differs on:\n{}", bad.join("\n"));
}

fn f32s(t: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn i64s(t: &safetensors::tensor::TensorView<'_>) -> Vec<i64> {
    assert_eq!(t.dtype(), safetensors::Dtype::I64);
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect()
}

fn kv_f32(kv: &KvTensor) -> Vec<f32> {
    assert_eq!(kv.dtype(), Dtype::F32);
    kv.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// KV and logits agree with a float64 numpy forward of the same GGUF
/// (tests/fixtures/make_llama_reference.py), with the cache injected
/// half-way to cover the `past` path too.
///
/// Tolerances: keys and values `|a - b| <= 0.01 + 0.002·|b|` (the runner
/// computes in f32 and rounds K/V to f16, relative error 2^-11, on values
/// up to a few tens; measured worst 0.0067); logits `|a - b| <= 0.03`
/// (measured worst 0.0077) with the same argmax.
#[test]
fn forward_matches_independent_reference() {
    let raw = std::fs::read(fixture("llama_reference.safetensors")).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&raw).expect("safetensors");
    let ids: Vec<u32> = i64s(&st.tensor("ids").expect("ids"))
        .iter()
        .map(|x| *x as u32)
        .collect();
    let layers = i64s(&st.tensor("layers").expect("layers"));
    let want_kv = f32s(&st.tensor("kv").expect("kv"));
    let want_logits = f32s(&st.tensor("logits").expect("logits"));
    let m = model();
    let cfg = m.config();
    assert_eq!(ids, m.tokenizer().encode(&fixture_text()), "fixture text ids");

    let split = ids.len() / 2;
    let first = m.prefill(&ids[..split], None).expect("prefill first half");
    let all = m.prefill(&ids[split..], Some(&first.kv)).expect("prefill rest");
    assert_eq!(all.kv.shape().tokens as usize, ids.len());
    let got_kv = kv_f32(&all.kv);
    let t = ids.len();
    let row = cfg.kv_heads * cfg.head_dim;
    let mut worst: f32 = 0.0;
    for (li, l) in layers.iter().enumerate() {
        for p in 0..2 {
            for i in 0..t * row {
                let want = want_kv[(li * 2 + p) * t * row + i];
                let got = got_kv[((*l as usize) * 2 + p) * t * row + i];
                let err = (got - want).abs();
                worst = worst.max(err);
                assert!(
                    err <= 0.01 + 0.002 * want.abs(),
                    "layer {l} {} element {i}: got {got}, want {want}",
                    ["K", "V"][p]
                );
            }
        }
    }
    let mut worst_logit: f32 = 0.0;
    for (g, w) in all.last_logits.iter().zip(&want_logits) {
        worst_logit = worst_logit.max((g - w).abs());
    }
    eprintln!("max |ΔKV| {worst}, max |Δlogit| {worst_logit}");
    assert_eq!(all.last_logits.len(), want_logits.len());
    assert!(worst_logit <= 0.03, "logits differ by up to {worst_logit}");
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
    };
    assert_eq!(argmax(&all.last_logits), argmax(&want_logits));
}

/// The text of `make_llama_reference.py`.
fn fixture_text() -> String {
    "<|im_start|>user\nThe quick brown fox jumps over the lazy dog. In 1776, \
     13 colonies declared independence; what happened next?<|im_end|>\n"
        .to_string()
}

fn document() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/texts/gettysburg-address.txt"),
    )
    .expect("bundled text")
}

/// A continuation from a cache stored losslessly (f16, through the codec)
/// is token for token the continuation after a fresh prefill.
#[test]
fn continuation_from_injected_lossless_kv_equals_fresh_prefill() {
    let m = model();
    let tok = m.tokenizer();
    let doc = tok.encode(&document());
    assert!(doc.len() > 256, "document crosses a step boundary");
    let prompt = tok.encode("\n<|im_start|>user\nWho gave this speech?<|im_end|>\n<|im_start|>assistant\n");

    let mut fresh = m.session(None).expect("session");
    fresh.feed(&doc).expect("prefill");
    let fresh_kv = fresh.kv().expect("kv");
    let want = fresh.generate(&prompt, 16).expect("generate");
    assert!(!want.tokens.is_empty());

    // Through the codec as kvault stores it: f16, lossless profile.
    let mut f16 = vec![0u8; fresh_kv.data().len() / 2];
    kvault_codec::convert(fresh_kv.data(), Dtype::F32, &mut f16, Dtype::F16).expect("convert");
    let f16 = KvTensor::new(fresh_kv.shape(), Dtype::F16, f16).expect("tensor");
    let blob = kvault_codec::encode(f16.view(), Profile::Lossless).expect("encode");
    let back = kvault_codec::decode(&blob).expect("decode");
    let got = m.generate(Some(&back), &prompt, 16).expect("generate from cache");
    assert_eq!(
        got.tokens,
        want.tokens,
        "{:?} vs {:?}",
        tok.decode(&got.tokens),
        tok.decode(&want.tokens)
    );

    // The cache holds f16 values, so the round trip is exact.
    let again = m
        .cache_to_kv(&m.cache_from_kv(&back).expect("inject"))
        .expect("read out");
    assert_eq!(again.data(), fresh_kv.data());
}

/// Perplexity scores continuation[1..]: natural text scores far better
/// than the same tokens shuffled, and a one-token continuation is refused.
#[test]
fn perplexity_separates_text_from_noise() {
    let m = model();
    let tok = m.tokenizer();
    let ids = tok.encode(&document());
    let (prefix, cont) = ids.split_at(100);
    let kv = m.prefill(prefix, None).expect("prefill").kv;
    let good = m.perplexity(&kv, &cont[..80]).expect("ppl");
    let mut shuffled = cont[..80].to_vec();
    shuffled.reverse();
    let bad = m.perplexity(&kv, &shuffled).expect("ppl");
    eprintln!("ppl text {good:.2}, reversed {bad:.2}");
    assert!(good > 1.0 && good < 30.0, "ppl of the address {good}");
    assert!(bad > 5.0 * good, "reversed {bad} vs text {good}");
    assert!(matches!(
        m.perplexity(&kv, &cont[..1]),
        Err(ModelError::BadInput(_))
    ));
}

/// A GGUF file with only a header and the given metadata strings.
fn tiny_gguf(kv: &[(&str, &str)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(8u32.to_le_bytes()); // string
        b.extend((v.len() as u64).to_le_bytes());
        b.extend(v.as_bytes());
    }
    b
}

#[test]
fn bad_model_files_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let gpt2 = dir.path().join("gpt2.gguf");
    std::fs::write(&gpt2, tiny_gguf(&[("general.architecture", "gpt2")])).expect("write");
    let e = LlamaModel::load(&gpt2).err().expect("refused");
    assert!(matches!(&e, ModelError::NotLlama(a) if a == "gpt2"), "{e}");

    let real = std::fs::read(model_path()).expect("model");
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &real[..real.len() / 2]).expect("write");
    let e = LlamaModel::load(&cut).err().expect("refused");
    assert!(matches!(e, ModelError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");

    std::fs::write(&cut, &real[..4096]).expect("write");
    let e = LlamaModel::load(&cut).err().expect("refused");
    assert!(matches!(e, ModelError::Format { .. }), "{e}");

    let e = LlamaModel::load(dir.path().join("missing.gguf"))
        .err()
        .expect("refused");
    assert!(matches!(e, ModelError::Io { .. }), "{e}");
}

#[test]
fn bad_documents_are_refused_before_any_work() {
    let m = model();
    assert!(matches!(m.encode_document(""), Err(ModelError::EmptyInput)));
    assert!(matches!(m.prefill(&[], None), Err(ModelError::EmptyInput)));
    let ctx = m.config().context_length;
    assert_eq!(ctx, 8192);
    let long = "word ".repeat(ctx + 10);
    match m.encode_document(&long) {
        Err(ModelError::TooLong { tokens, context }) => {
            assert!(tokens > context);
            assert_eq!(context, ctx);
        }
        other => panic!("expected TooLong, got {other:?}"),
    }
    let ids = vec![1u32; ctx + 1];
    assert!(matches!(m.prefill(&ids, None), Err(ModelError::TooLong { .. })));
    assert!(matches!(
        m.prefill(&[u32::MAX], None),
        Err(ModelError::BadInput(_))
    ));
}

fn run_ok(args: &[&str]) -> String {
    let out = kvault_tests::kvault(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kvault {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `kvault warmup` stores a document chunk by chunk, resumes from a stored
/// prefix, skips what is stored, refuses bad documents without storing them;
/// `kvault ask` then takes the whole prefix from kvault and answers exactly
/// as it does when recomputing.
#[test]
fn warmup_then_ask_through_a_real_server() {
    let server = kvault_tests::TestServer::start(&[]);
    let url = server.url();
    let model = model_path();
    let model = model.to_str().expect("utf-8 path");
    let dir = tempfile::tempdir().expect("tmp");
    let full = document();
    // A cut well past 256 tokens: its first chunk is the full text's first chunk.
    let cut = &full[..full.len() * 4 / 5];
    let jsonl = dir.path().join("docs.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{}\n{}\n",
            serde_json::json!({"id": "empty", "text": ""}),
            serde_json::json!({"id": "cut", "text": cut})
        ),
    )
    .expect("write");
    let out = kvault_tests::kvault(&[
        "warmup",
        "--server",
        &url,
        "--model",
        model,
        "--input",
        jsonl.to_str().expect("path"),
        "--quiet",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a refused document fails the run:\n{text}");
    assert!(text.contains("refused: empty: empty input"), "{text}");
    assert!(text.contains("0 from kvault"), "{text}");

    let doc = dir.path().join("address.txt");
    std::fs::write(&doc, &full).expect("write");
    let dump = dir.path().join("dump.safetensors");
    let args = [
        "warmup",
        "--server",
        &url,
        "--model",
        model,
        "--input",
        doc.to_str().expect("path"),
        "--quiet",
        "--dump-kv",
        dump.to_str().expect("path"),
    ];
    let text = run_ok(&args);
    assert!(
        text.contains("336 tokens: 256 from kvault, 80 prefilled"),
        "resumes after the stored chunk:\n{text}"
    );
    let dumped = kvault_client::kv_file::read(&dump).expect("dump");
    assert_eq!(dumped.ids.len(), 336);
    assert_eq!(dumped.kv.shape().tokens, 336);
    let text = run_ok(&args);
    assert!(text.contains("(1 already stored)"), "{text}");
    assert!(text.contains("336 from kvault, 0 prefilled"), "{text}");

    let ask = |extra: &[&str]| {
        let mut a = vec![
            "ask",
            "--server",
            &url,
            "--model",
            model,
            "--input",
            doc.to_str().expect("path"),
            "--prompt",
            "Who gave this speech?",
            "--max-new",
            "12",
        ];
        a.extend_from_slice(extra);
        run_ok(&a)
    };
    let cached = ask(&[]);
    assert!(cached.contains("336 from kvault"), "{cached}");
    let fresh = ask(&["--no-cache"]);
    assert!(fresh.contains("0 from kvault"), "{fresh}");
    let answer = |s: &str| s.lines().find(|l| l.starts_with("answer:")).map(str::to_string);
    assert!(
        answer(&cached).is_some_and(|a| a.len() > "answer: ".len()),
        "{cached}"
    );
    assert_eq!(answer(&cached), answer(&fresh));
    // Through a sidecar in front of the same server (its Unix socket): the
    // whole prefix from kvault again, and the same answer.
    let sc = kvault_tests::TestSidecar::start(std::slice::from_ref(&url), &["--ram-bytes", "64MiB"]);
    let sock = sc.proc.as_ref().expect("running").socket.clone();
    let via = ask(&["--sidecar", sock.to_str().expect("utf-8 path")]);
    assert!(via.contains("336 from kvault"), "{via}");
    assert_eq!(answer(&via), answer(&cached));
    // Attention over the stored prefix computed by the server: the same greedy tokens.
    let offloaded = ask(&["--offload"]);
    assert!(
        offloaded.contains("attention offloaded: 336 prefix tokens"),
        "{offloaded}"
    );
    let ids = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("answer ids:"))
            .map(str::to_string)
    };
    assert!(ids(&cached).is_some(), "{cached}");
    assert_eq!(ids(&offloaded), ids(&cached));
    // A quantised layout on the server decodes the same way (lossy: its
    // tokens may differ).
    let k4 = ask(&["--offload", "--offload-layout", "k4v4"]);
    assert!(k4.contains("attention offloaded: 336 prefix tokens"), "{k4}");
    assert!(ids(&k4).is_some(), "{k4}");
}

/// The README's main command, end to end (a short answer to keep it quick).
#[test]
fn demo_runs_end_to_end() {
    let model = model_path();
    let doc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/texts/gettysburg-address.txt");
    let text = run_ok(&[
        "demo",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--input",
        doc.to_str().expect("utf-8 path"),
        "--max-new",
        "8",
    ]);
    assert!(text.contains("answers  : identical, token for token"), "{text}");
    assert!(text.contains("bit-exact with the model's cache: yes"), "{text}");
    assert!(text.contains("cached (kvault RAM)        336"), "{text}");
}

/// The cells of the row of `table_line`s (markdown) whose first cell is `first`.
fn row<'a>(lines: &'a [&'a str], first: &str) -> Vec<&'a str> {
    let line = lines
        .iter()
        .find(|l| l.split('|').nth(1).map(str::trim) == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in\n{}", lines.join("\n")));
    line.split('|').map(str::trim).filter(|c| !c.is_empty()).collect()
}

/// The leading number of a cell such as `0.01234 ± 0.00100` or `+1.5% ± 0.2%`.
fn num(cell: &str) -> f64 {
    let head: String = cell
        .trim_start_matches('+')
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
        .collect();
    head.parse().unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

/// `kvault codec-eval` on a real text: the lossless profile changes nothing (Δppl and KL
/// exactly 0, the same top token everywhere), a lossy profile has a positive KL, `--tune`
/// adds its row, windows are pooled; bad arguments are refused.
#[test]
fn codec_eval_reports_quality_per_profile() {
    let model = model_path();
    let model = model.to_str().expect("utf-8 path");
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/texts/declaration-of-independence.txt");
    let text = text.to_str().expect("utf-8 path");
    let out = run_ok(&[
        "codec-eval",
        "--model",
        model,
        "--input",
        text,
        "--prefix-tokens",
        "64",
        "--cont-tokens",
        "24",
        "--windows",
        "2",
        "--chunk-tokens",
        "32",
        "--profiles",
        "lossless,kv-mid",
        "--tune",
        "0.9,1.2,1",
    ]);
    let summary: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("All texts")).collect();
    let lossless = row(&summary, "lossless");
    assert_eq!(lossless[1], "2", "{out}");
    assert_eq!(lossless[2], "46", "two windows of 23 scored tokens\n{out}");
    assert_eq!(num(lossless[7]), 0.0, "{out}");
    assert_eq!(num(lossless[8]), 0.0, "{out}");
    assert_eq!(lossless[9], "100.00%", "{out}");
    let mid = row(&summary, "kv-mid");
    assert!(num(mid[3]) > 4.0, "kv-mid ratio {}\n{out}", mid[3]);
    assert!(num(mid[8]) > 0.0, "kv-mid KL {}\n{out}", mid[8]);
    // kv-mid's own factors (and its key rows of 64 tokens) through --tune: kv-mid again.
    let tuned = row(&summary, "tuned k0.9 v1.2 e1 kp0 vp1.5 rows64");
    assert_eq!(tuned[3..], mid[3..], "{out}");
    for bad in [
        &["--tune", "1"][..],
        &["--tune", "0.5,x"],
        &["--tune", "-1,1"],
        &["--tune", "0.9,1.2,1,0,1.5,64,1,0.5"],
        &["--tune", "0.9,1.2,1,0,1.5,64,1,512,1.5"],
        &["--tune", "0.9,1.2,1,0,1.5,64,1,512,1,2"],
        &["--cont-tokens", "4000"],
    ] {
        let mut args = vec![
            "codec-eval",
            "--model",
            model,
            "--input",
            text,
            "--profiles",
            "kv-mid",
        ];
        args.extend_from_slice(bad);
        let out = kvault_tests::kvault(&args);
        assert!(!out.status.success(), "{bad:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{bad:?}: {err}");
    }
}

/// `kvault bench codec` in one small run: every (chunk, profile) row, the original cache
/// against itself at exactly 0, and the comparison of the default profile with
/// cachegen-baseline per chunk size.
#[test]
fn bench_codec_prints_the_side_by_side_table() {
    let model = model_path();
    let model = model.to_str().expect("utf-8 path");
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/texts/declaration-of-independence.txt");
    let text = text.to_str().expect("utf-8 path");
    let out = run_ok(&[
        "bench",
        "codec",
        "--model",
        model,
        "--input",
        text,
        "--tokens",
        "64",
        "--cont-tokens",
        "16",
        "--windows",
        "2",
        "--chunk-tokens",
        "32,64",
        "--threads",
        "1",
        "--seconds",
        "0.01",
        "--profiles",
        "cachegen-baseline,kv-mid",
    ]);
    assert!(
        out.contains("original vs itself: Δppl +0.000% ± 0.000%, KL 0.00000 ± 0.00000"),
        "{out}"
    );
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("| kv-mid |") || l.starts_with("| cachegen-baseline |"))
        .collect();
    assert_eq!(rows.len(), 4, "{out}");
    for r in &rows {
        let cells: Vec<&str> = r.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(cells.len(), 10, "{r}");
        assert!(num(cells[7]) > 0.0, "KL of a lossy profile: {r}");
        // Speeds are timed (a debug build may print 0.00): they must be numbers.
        assert!(num(cells[8]) >= 0.0 && num(cells[9]) >= 0.0, "speeds: {r}");
    }
    for chunk in [32, 64] {
        assert!(out.contains(&format!("chunk {chunk}: kv-mid is ")), "{out}");
    }
}

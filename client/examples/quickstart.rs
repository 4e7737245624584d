//! Stores a prefix's KV cache in a running kvault-server and fetches it back.
//!
//! ```sh
//! target/release/kvault-server --listen 127.0.0.1:7070 --data-dir /tmp/kv &
//! cargo run -p kvault-client --example quickstart -- http://127.0.0.1:7070
//! ```

use kvault_client::{ChunkStore, Client, Layout};
use kvault_codec::{Dtype, KvShape, KvTensor, Profile};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:7070".into());
    let client = Client::connect(url).await?;

    // The layout of SmolLM2-135M; a serving engine takes these from its model config.
    let layout = Layout {
        model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
        dtype: Dtype::F16,
        chunk_tokens: 256,
        rope: None,
    };
    // A 600-token prefix: two whole chunks and a partial one. An engine passes
    // its real KV cache here; this example fills it with a pattern.
    let ids: Vec<u32> = (0..600).map(|i| (i * 31 + 7) % 49_152).collect();
    let shape = KvShape {
        layers: 30,
        tokens: 600,
        kv_heads: 3,
        head_dim: 64,
    };
    let mut kv = KvTensor::zeros(shape, Dtype::F16)?;
    for (i, b) in kv.data_mut().chunks_exact_mut(2).enumerate() {
        b.copy_from_slice(&half::f16::from_f32(((i % 97) as f32 - 48.0) / 16.0).to_le_bytes());
    }

    let put = client
        .put_prefix(&layout, &kv.view(), &ids, Profile::Lossless, 4)
        .await?;
    println!(
        "stored {} new of {} chunks ({} bytes encoded, {} bytes as fp16)",
        put.new, put.chunks, put.stored_bytes, put.fp16_bytes
    );

    // A request whose prompt starts with the same 600 tokens and goes on.
    let mut prompt = ids.clone();
    prompt.extend([1, 2, 3]);
    match client.get_prefix(&layout, &prompt, Dtype::F16).await? {
        Some(hit) => {
            // The partial third chunk was keyed by its own 88 tokens, so the
            // longer prompt reuses the two whole chunks: 512 tokens.
            let want = kvault_client::prefix::slice_tokens(&kv.view(), 0, hit.tokens as u32)?;
            let same = hit.kv.data() == want.data();
            println!(
                "cached prefix: {} of {} tokens, {} chunks, bit-exact: {same}",
                hit.tokens,
                prompt.len(),
                hit.chunks
            );
        }
        None => println!("nothing cached"),
    }
    Ok(())
}

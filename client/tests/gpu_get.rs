//! `Client::get_to_device` against a real `kvault-server` process: prefixes stored with
//! GPU-decodable profiles and with lossless (CPU fallback) arrive in device memory equal,
//! bit for bit, to the CPU path (`get_prefix`), canonical and paged, whole and by layer
//! range. Needs a GPU: skipped with a message without one, unless `KVAULT_REQUIRE_GPU=1`.

use kvault_client::gpu::{GpuDecoder, KernelError, OutDtype, Target};
use kvault_client::local_server::LocalServer;
use kvault_client::{ChunkStore, Client, Layout, chain_keys};
use kvault_codec::{Dtype, KvShape, KvTensor, Profile};
use kvault_kernels::cudarc::driver::CudaSlice;

fn decoder() -> Option<GpuDecoder> {
    match GpuDecoder::new(0) {
        Ok(d) => Some(d),
        Err(KernelError::NoGpu(why)) if std::env::var("KVAULT_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("skipped: {why}");
            None
        }
        Err(e) => panic!("GPU decoder: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_arrive_in_device_memory_as_on_the_cpu() {
    let Some(dec) = decoder() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = LocalServer::start(dir.path(), &[]).unwrap();
    let client = Client::connect(server.url()).await.unwrap();
    let shape = KvShape {
        layers: 6,
        tokens: 600,
        kv_heads: 3,
        head_dim: 64,
    };
    let kv = kvault_kernels::synthetic::kv_like(shape, 9);
    let stream = dec.stream().clone();
    for (i, profile) in [Profile::KvMid, Profile::Q8, Profile::Lossless]
        .into_iter()
        .enumerate()
    {
        let layout = Layout {
            model_id: format!("gpu-test-{i}"),
            layers: 6,
            kv_heads: 3,
            head_dim: 64,
            dtype: Dtype::F16,
            chunk_tokens: 256,
            rope: None,
        };
        let ids: Vec<u32> = (0..600).map(|t| t * 7 + i as u32).collect();
        client
            .put_prefix(&layout, &kv.view(), &ids, profile, 2)
            .await
            .unwrap();
        let keys = chain_keys(&layout.namespace_id(), &ids, 256);
        let cpu: KvTensor = client
            .get_prefix(&layout, &ids, Dtype::F16)
            .await
            .unwrap()
            .unwrap()
            .kv;
        // Whole prefix, canonical.
        let mut out: CudaSlice<u8> = stream.alloc_zeros(cpu.data().len()).unwrap();
        client
            .get_to_device(
                &layout,
                &keys,
                None,
                &dec,
                OutDtype::F16,
                Target::Canonical(&mut out),
            )
            .await
            .unwrap();
        assert!(
            stream.clone_dtoh(&out).unwrap() == cpu.data(),
            "{profile}: canonical"
        );
        // Layers 2..5, paged in blocks of 16 tokens, reversed.
        let row = 3 * 64 * 2;
        let blocks = 600usize.div_ceil(16);
        let table: Vec<u32> = (0..blocks as u32).rev().collect();
        let mut k: Vec<CudaSlice<u8>> = (0..3)
            .map(|_| stream.alloc_zeros(blocks * 16 * row).unwrap())
            .collect();
        let mut v: Vec<CudaSlice<u8>> = (0..3)
            .map(|_| stream.alloc_zeros(blocks * 16 * row).unwrap())
            .collect();
        let target = Target::Paged {
            k: &mut k,
            v: &mut v,
            block_size: 16,
            block_table: &table,
        };
        client
            .get_to_device(&layout, &keys, Some(2..5), &dec, OutDtype::F16, target)
            .await
            .unwrap();
        for l in 0..3usize {
            for (kind, cache) in [(0usize, &k[l]), (1, &v[l])] {
                let host = stream.clone_dtoh(cache).unwrap();
                for t in 0..600usize {
                    let at = (table[t / 16] as usize * 16 + t % 16) * row;
                    let want = &cpu.data()[(((l + 2) * 2 + kind) * 600 + t) * row..][..row];
                    assert!(
                        &host[at..at + row] == want,
                        "{profile}: paged layer {l} kind {kind} token {t}"
                    );
                }
            }
        }
        // A missing chunk is a clear error.
        let mut wrong = keys.clone();
        wrong[1] = chain_keys(&layout.namespace_id(), &[1, 2, 3], 256)[0];
        let r = client
            .get_to_device(
                &layout,
                &wrong,
                None,
                &dec,
                OutDtype::F16,
                Target::Canonical(&mut out),
            )
            .await;
        assert!(matches!(r, Err(kvault_client::ClientError::NotFound(_))), "{r:?}");
    }
    server.stop().unwrap();
}

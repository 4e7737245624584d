//! Shared pieces of the end-to-end tests: a real `kvault-server` process in
//! a temporary directory, the real `kvault` CLI, and KV tensors to store.

use std::path::{Path, PathBuf};
use std::process::Output;

use kvault_client::local_server::LocalServer;
use kvault_client::{Client, Layout};
use kvault_codec::{Dtype, KvShape, KvTensor};
use rand::{RngCore, SeedableRng};

/// A server process with its own data directory, removed afterwards.
pub struct TestServer {
    /// The process.
    pub proc: Option<LocalServer>,
    /// Its data directory (kept alive for the test's duration).
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with extra flags.
    pub fn start(extra: &[&str]) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let proc = LocalServer::start(&dir.path().join("data"), extra).expect("start kvault-server");
        TestServer {
            proc: Some(proc),
            dir,
        }
    }

    /// Restarts on the same data directory (new port).
    pub fn restart(&mut self, extra: &[&str]) {
        if let Some(p) = self.proc.take() {
            assert!(p.stop().expect("stop"), "server did not stop gracefully");
        }
        self.proc =
            Some(LocalServer::start(&self.dir.path().join("data"), extra).expect("restart kvault-server"));
    }

    /// `http://ADDR` of the running process.
    pub fn url(&self) -> String {
        self.proc.as_ref().expect("running").url()
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        Client::connect(self.url()).await.expect("connect")
    }

    /// Stops with SIGTERM; true when it exited cleanly.
    pub fn stop(&mut self) -> bool {
        self.proc.take().map(|p| p.stop().expect("stop")).unwrap_or(true)
    }
}

/// SmolLM2-135M's layout under a given model id.
pub fn smol_layout(model_id: &str, dtype: Dtype, chunk_tokens: u32) -> Layout {
    Layout {
        model_id: model_id.into(),
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
        dtype,
        chunk_tokens,
        rope: None,
    }
}

/// A KV tensor of `layout`'s shape with `tokens` tokens of finite random values.
pub fn random_kv(layout: &Layout, tokens: u32, seed: u64) -> KvTensor {
    let shape = KvShape {
        layers: layout.layers,
        tokens,
        kv_heads: layout.kv_heads,
        head_dim: layout.head_dim,
    };
    let n = shape.elements() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f32s = vec![0f32; n];
    for v in f32s.iter_mut() {
        *v = (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 8.0;
    }
    let src: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = vec![0u8; shape.byte_len(layout.dtype).expect("size")];
    kvault_codec::convert(&src, Dtype::F32, &mut out, layout.dtype).expect("convert");
    KvTensor::new(shape, layout.dtype, out).expect("tensor")
}

/// Token ids for a test prefix, distinct per seed.
pub fn ids(tokens: u32, seed: u32) -> Vec<u32> {
    (0..tokens)
        .map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 49_152)
        .collect()
}

/// Path of a workspace binary (built beside the test executables).
pub fn bin(name: &str) -> PathBuf {
    let server = LocalServer::binary().expect("kvault-server binary");
    let p = server.with_file_name(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --bins` first",
        p.display()
    );
    p
}

/// Runs the `kvault` CLI and returns its output.
pub fn kvault(args: &[&str]) -> Output {
    std::process::Command::new(bin("kvault"))
        .args(args)
        .env_remove("KVAULT_SERVER")
        .output()
        .expect("run kvault")
}

/// Writes a KV file and returns its path.
pub fn write_kv_file(dir: &Path, name: &str, kv: &KvTensor, ids: &[u32]) -> PathBuf {
    let p = dir.join(name);
    kvault_client::kv_file::write(&p, kv, ids).expect("write kv file");
    p
}

/// Path of SmolLM2-135M-Instruct's GGUF: `$KVAULT_MODEL` when set, else
/// whatever `scripts/fetch-model.sh` prints (it downloads and checks the file
/// once, then answers from its cache).
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KVAULT_MODEL") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-model.sh"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-model.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A `kvault-sidecar` process with its socket (and region file) in a temporary directory.
pub struct TestSidecar {
    /// The process.
    pub proc: Option<kvault_client::local_server::LocalSidecar>,
    /// Holds the socket and region files.
    pub dir: tempfile::TempDir,
}

impl TestSidecar {
    /// Starts a sidecar in front of `upstreams` with extra flags; its region
    /// file (when `--shm-bytes` is given) lives in the temporary directory,
    /// and its Lookup deadline is 5 s unless `extra` sets one.
    pub fn start(upstreams: &[String], extra: &[&str]) -> TestSidecar {
        let dir = tempfile::tempdir().expect("temp dir");
        let region = dir.path().join("region");
        let region = region.to_str().expect("utf-8 temp path");
        let mut args: Vec<&str> = extra.to_vec();
        if extra.contains(&"--shm-bytes") {
            args.extend(["--shm", region]);
        }
        // The default Lookup deadline (20 ms) is a serving budget; on two
        // shared cores under a parallel suite an upstream answer can take
        // longer and the lookup degrades to "not cached". Tests of that
        // deadline set their own.
        if !extra.contains(&"--lookup-deadline-ms") {
            args.extend(["--lookup-deadline-ms", "5000"]);
        }
        let proc =
            kvault_client::local_server::LocalSidecar::start(upstreams, &dir.path().join("sock"), &args)
                .expect("start kvault-sidecar");
        TestSidecar {
            proc: Some(proc),
            dir,
        }
    }

    /// `unix:PATH` of the socket.
    pub fn url(&self) -> String {
        self.proc.as_ref().expect("running").url()
    }

    /// A client connected over the Unix socket.
    pub async fn client(&self) -> Client {
        Client::connect(self.url()).await.expect("connect to sidecar")
    }

    /// Stops with SIGTERM; true when it exited cleanly.
    pub fn stop(&mut self) -> bool {
        self.proc.take().map(|p| p.stop().expect("stop")).unwrap_or(true)
    }
}

/// `GET /metrics` of a server or sidecar, over plain HTTP/1.0.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read metrics");
    out
}

/// Sum of every sample of a metric family (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

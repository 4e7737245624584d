//! Several kvault servers as one store, with membership in a real etcd
//! (Debian's `etcd-server`, started by each test on loopback ports).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kvault_client::local_server::{LocalEtcd, LocalServer};
use kvault_client::{
    ChunkKey, ChunkStore, Client, Cluster, ClusterConfig, Layout, Membership, Tier, chain_keys,
};
use kvault_codec::{Dtype, Profile};
use kvault_tests::{TestSidecar, ids, kvault, metric_sum, random_kv, scrape};

/// A small layout, so that long prefixes stay cheap: 2 layers, 1 KV head of 64.
fn small_layout(model_id: &str) -> Layout {
    Layout {
        model_id: model_id.into(),
        layers: 2,
        kv_heads: 1,
        head_dim: 64,
        dtype: Dtype::F16,
        chunk_tokens: 256,
        rope: None,
    }
}

struct Etcd {
    proc: LocalEtcd,
    _dir: tempfile::TempDir,
}

fn etcd() -> Etcd {
    let dir = tempfile::tempdir().expect("temp dir");
    let proc = LocalEtcd::start(&dir.path().join("etcd"))
        .expect("start etcd (scripts/deps.sh etcd-server installs it)");
    Etcd { proc, _dir: dir }
}

/// A server registered in etcd, with its own data directory.
struct Node {
    proc: Option<LocalServer>,
    dir: tempfile::TempDir,
    flags: Vec<String>,
}

impl Node {
    fn start(etcd: &str, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut flags: Vec<String> = vec!["--etcd".into(), etcd.into(), "--etcd-ttl-secs".into(), "2".into()];
        flags.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let proc = LocalServer::start(&dir.path().join("data"), &args).expect("start kvault-server");
        Node {
            proc: Some(proc),
            dir,
            flags,
        }
    }

    fn url(&self) -> String {
        self.proc.as_ref().expect("running").url()
    }

    fn kill(&mut self) -> std::net::SocketAddr {
        let p = self.proc.take().expect("running");
        let addr = p.addr;
        p.kill().expect("kill");
        addr
    }

    /// Starts again on the same address (so on the same placement id).
    fn restart_at(&mut self, addr: std::net::SocketAddr) {
        let args: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        self.proc = Some(
            LocalServer::start_at(&self.dir.path().join("data"), &addr.to_string(), &args)
                .expect("restart kvault-server"),
        );
    }

    async fn client(&self) -> Client {
        Client::connect(self.url()).await.expect("connect")
    }
}

async fn cluster_on(etcd: &str, grace: Duration) -> Cluster {
    let mut cfg = ClusterConfig::new(Membership::Etcd {
        endpoints: etcd.into(),
        prefix: "/kvault".into(),
    });
    cfg.grace = grace;
    cfg.sync_timeout = Duration::from_secs(10);
    cfg.nodes.breaker_cool_down = Duration::from_millis(300);
    cfg.nodes.client.request_timeout = Duration::from_secs(10);
    Cluster::connect(cfg).await.expect("connect to the cluster")
}

async fn wait_nodes(c: &Cluster, n: usize) {
    assert!(
        c.wait_routes(Duration::from_secs(20), |r| r.members().len() == n)
            .await,
        "cluster did not reach {n} nodes: has {:?}",
        c.routes().members()
    );
}

/// One chunk (lossless, so its bytes are reproducible) per seed, keyed as a one-chunk prefix.
fn chunks(layout: &Layout, seeds: std::ops::Range<u32>) -> Vec<(ChunkKey, Bytes)> {
    seeds
        .map(|s| {
            let kv = random_kv(layout, layout.chunk_tokens, s as u64);
            let key = chain_keys(
                &layout.namespace_id(),
                &ids(layout.chunk_tokens, s),
                layout.chunk_tokens as usize,
            )[0];
            let blob = kvault_codec::encode(kv.view(), Profile::Lossless).expect("encode");
            (key, Bytes::from(blob))
        })
        .collect()
}

async fn held_by(node: &Client, layout: &Layout, keys: &[ChunkKey]) -> Vec<bool> {
    node.exists(layout, keys)
        .await
        .expect("exists")
        .into_iter()
        .map(|t| t != Tier::None)
        .collect()
}

fn metric(c: &Cluster, name: &str) -> f64 {
    metric_sum(&c.render_metrics(), name)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_in_etcd_agree_on_placement_and_serve_a_32k_prefix_bit_exact() {
    let e = etcd();
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&e.proc.url(), &["--join-ramp-secs", "0"]))
        .collect();
    let a = cluster_on(&e.proc.url(), Duration::from_secs(60)).await;
    let b = cluster_on(&e.proc.url(), Duration::from_secs(60)).await;
    wait_nodes(&a, 3).await;
    wait_nodes(&b, 3).await;

    // Two clients, same node set: same owners for every key.
    let layout = small_layout("cluster-long");
    let ns = layout.namespace_id();
    let (ra, rb) = (a.routes(), b.routes());
    for i in 0..5000u32 {
        let k = ChunkKey::derive(&ns, None, &[i]);
        assert_eq!(ra.owners(&k, "m"), rb.owners(&k, "m"), "key {i}");
    }

    // A 32k-token prefix written through one client, read through the other.
    let tokens = 32 * 1024;
    let kv = random_kv(&layout, tokens, 7);
    let prompt = ids(tokens, 7);
    let put = a
        .put_prefix(&layout, &kv.view(), &prompt, Profile::Lossless, 8)
        .await
        .expect("put");
    assert_eq!((put.chunks, put.new, put.unavailable), (128, 128, 0));
    let keys = chain_keys(&ns, &prompt, 256);
    let l = ChunkStore::lookup(&b, &layout, &keys).await.expect("lookup");
    assert_eq!(l.prefix_chunks, 128);
    let got = b
        .get_prefix(&layout, &prompt, Dtype::F16)
        .await
        .expect("get")
        .expect("cached");
    assert_eq!(got.tokens, tokens as usize);
    assert!(got.kv.data() == kv.data(), "the prefix comes back bit-exact");

    // Every chunk lives exactly where placement says, and all three nodes hold some.
    let routes = b.routes();
    let mut per_node = BTreeMap::new();
    for n in &nodes {
        let held = held_by(&n.client().await, &layout, &keys).await;
        for (k, h) in keys.iter().zip(&held) {
            let owner = routes.owners(k, &layout.model_id)[0] == n.url();
            assert_eq!(*h, owner, "chunk held by {} iff it owns it", n.url());
        }
        per_node.insert(n.url(), held.iter().filter(|h| **h).count());
    }
    assert_eq!(per_node.values().sum::<usize>(), 128);
    assert!(
        per_node.values().all(|&c| c >= 20),
        "spread over the three: {per_node:?}"
    );

    // A longest-prefix answer across nodes is exact: delete one chunk in the middle.
    assert_eq!(
        ChunkStore::delete(&a, &layout, &keys[77..78])
            .await
            .expect("delete"),
        1
    );
    let l = ChunkStore::lookup(&b, &layout, &keys).await.expect("lookup");
    assert_eq!(l.prefix_chunks, 77);
    assert_eq!(l.tiers.iter().filter(|t| **t != Tier::None).count(), 127);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_becomes_misses_and_a_restarted_one_converges_with_nothing_served_wrong() {
    let e = etcd();
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&e.proc.url(), &["--join-ramp-secs", "2"]))
        .collect();
    let c = cluster_on(&e.proc.url(), Duration::from_secs(60)).await;
    wait_nodes(&c, 3).await;
    // Wait out the servers' own ramp, so the first placement is the full one.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let layout = small_layout("cluster-churn");
    let first = chunks(&layout, 0..90);
    for (k, b) in &first {
        assert!(ChunkStore::put(&c, &layout, k, b.clone()).await.expect("put"));
    }
    let expected: Arc<std::sync::Mutex<BTreeMap<ChunkKey, Bytes>>> =
        Arc::new(std::sync::Mutex::new(first.iter().cloned().collect()));

    // A reader that checks every answer, all the time: a hit must be the bytes
    // written, a miss is fine, an error is not.
    let stop = Arc::new(AtomicBool::new(false));
    let (wrong, errors, hits) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let reader = {
        let (c, layout, expected, stop) = (c.clone(), layout.clone(), expected.clone(), stop.clone());
        let (wrong, errors, hits) = (wrong.clone(), errors.clone(), hits.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let want: Vec<(ChunkKey, Bytes)> = expected
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(k, b)| (*k, b.clone()))
                    .collect();
                let keys: Vec<ChunkKey> = want.iter().map(|(k, _)| *k).collect();
                match ChunkStore::get_many(&c, &layout, &keys, None).await {
                    Ok(got) => {
                        for ((_, w), g) in want.iter().zip(got) {
                            if let Some(f) = g {
                                if f.blob != *w {
                                    wrong.fetch_add(1, Ordering::Relaxed);
                                }
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("read error: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Kill one server: once its lease expires it leaves the node set.
    let victim_url = nodes[1].url();
    let victim_addr = nodes[1].kill();
    wait_nodes(&c, 2).await;
    let routes = c.routes();
    let got = ChunkStore::get_many(
        &c,
        &layout,
        &first.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        None,
    )
    .await
    .expect("reads go on");
    let mut lost = 0;
    for ((k, b), g) in first.iter().zip(&got) {
        let was_victims = routes
            .candidates(k, &layout.model_id, 0, std::time::Instant::now())
            .contains(&victim_url.as_str());
        match g {
            Some(f) => assert_eq!(&f.blob, b),
            None => {
                assert!(was_victims, "only the dead server's keys miss");
                lost += 1;
            }
        }
    }
    assert!(
        (10..60).contains(&lost),
        "{lost} of 90 keys were on the dead server"
    );
    // Writes go on: new keys land on the two live servers.
    let second = chunks(&layout, 1000..1090);
    for (k, b) in &second {
        assert!(
            ChunkStore::put(&c, &layout, k, b.clone())
                .await
                .expect("put while a node is gone")
        );
    }
    expected.lock().unwrap().extend(second.iter().cloned());

    // Start it again (same address, empty RAM): it rejoins, ramps up, and keys
    // written while it was gone that it now owns are read from their previous
    // owner and copied forward to it.
    let health_ok =
        format!("kvault_cluster_calls_total{{node=\"{victim_url}\",op=\"health\",outcome=\"ok\"}}");
    let warmed_before = metric(&c, &health_ok);
    nodes[1].restart_at(victim_addr);
    // Same data directory, same id: a rejoin, so its weight starts low and ramps.
    wait_nodes(&c, 3).await;
    // Its connection is opened when it joins (a health call), not inside the
    // deadline of the first request routed to it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&c, &health_ok) <= warmed_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection opened to the rejoined node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let share = |r: &kvault_client::cluster::Routes| {
        r.shares()
            .into_iter()
            .find(|(id, _)| *id == victim_url)
            .map_or(0.0, |(_, s)| s)
    };
    assert!(
        share(&c.routes()) < 0.25,
        "a rejoining node starts with a fraction of its share"
    );
    assert!(
        c.wait_routes(Duration::from_secs(20), |r| r.members().len() == 3
            && r.shares().iter().all(|(_, s)| (s - 1.0 / 3.0).abs() < 1e-9))
            .await,
        "the restarted server did not ramp up to full weight"
    );
    let keys: Vec<ChunkKey> = second.iter().map(|(k, _)| *k).collect();
    let got = ChunkStore::get_many(&c, &layout, &keys, None)
        .await
        .expect("reads");
    assert!(
        got.iter().all(Option::is_some),
        "keys written during the outage stay readable"
    );
    let routes = c.routes();
    let moved: Vec<ChunkKey> = keys
        .iter()
        .filter(|k| routes.owners(k, &layout.model_id)[0] == victim_url)
        .copied()
        .collect();
    assert!(!moved.is_empty(), "some keys moved back to the restarted server");
    let victim = nodes[1].client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    // The server holds a copy a moment before the client's copier has its
    // answer and counts it, so both are awaited together.
    loop {
        let held = held_by(&victim, &layout, &moved).await.iter().all(|h| *h);
        let counted =
            metric(&c, "kvault_cluster_copy_forward_total{outcome=\"copied\"}") >= moved.len() as f64;
        if held && counted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "moved keys were not copied forward (held by the new owner: {held}, counted: {counted})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&c, "kvault_cluster_fallback_reads_total") > 0.0);

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.expect("reader");
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "a chunk was served wrong");
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "a read failed instead of missing"
    );
    assert!(hits.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_stopped_clients_keep_the_last_node_set_and_say_so() {
    let mut e = etcd();
    let nodes: Vec<Node> = (0..2)
        .map(|_| Node::start(&e.proc.url(), &["--join-ramp-secs", "0"]))
        .collect();
    let c = cluster_on(&e.proc.url(), Duration::from_secs(60)).await;
    wait_nodes(&c, 2).await;
    let layout = small_layout("cluster-etcd-down");
    let first = chunks(&layout, 0..20);
    for (k, b) in &first {
        ChunkStore::put(&c, &layout, k, b.clone()).await.expect("put");
    }
    assert_eq!(metric(&c, "kvault_cluster_membership_stale"), 0.0);

    e.proc.kill().expect("kill etcd");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !c.is_stale() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client did not notice etcd is gone"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&c, "kvault_cluster_membership_stale"), 1.0);
    assert!(metric(&c, "kvault_cluster_membership_errors_total") >= 1.0);
    assert_eq!(
        c.routes().members().len(),
        2,
        "the last known node set stays in use"
    );
    // Reads and writes go on against the servers.
    let keys: Vec<ChunkKey> = first.iter().map(|(k, _)| *k).collect();
    let got = ChunkStore::get_many(&c, &layout, &keys, None).await.expect("get");
    for ((_, b), g) in first.iter().zip(got) {
        assert_eq!(g.expect("hit").blob, *b);
    }
    for (k, b) in chunks(&layout, 100..110) {
        assert!(
            ChunkStore::put(&c, &layout, &k, b)
                .await
                .expect("put while etcd is down")
        );
    }
    // A client that starts now cannot learn the node set, and says why.
    let mut cfg = ClusterConfig::new(Membership::Etcd {
        endpoints: e.proc.url(),
        prefix: "/kvault".into(),
    });
    cfg.sync_timeout = Duration::from_millis(500);
    let err = Cluster::connect(cfg).await.err().expect("no etcd, no node set");
    assert!(err.to_string().contains("etcd"), "{err}");

    // etcd back: the client catches up, and the servers are still registered.
    e.proc.restart().expect("restart etcd");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.is_stale() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client did not reconnect to etcd"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_nodes(&c, 2).await;
    let urls: Vec<String> = c.routes().members().iter().map(|m| m.id.clone()).collect();
    for n in &nodes {
        assert!(urls.contains(&n.url()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_with_two_replicas_is_written_to_both_and_read_from_either() {
    let e = etcd();
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&e.proc.url(), &["--join-ramp-secs", "0"]))
        .collect();
    kvault_membership::Etcd::connect(&e.proc.url())
        .expect("etcd handle")
        .put("/kvault/replicas/cluster-hot", b"2".to_vec(), 0)
        .await
        .expect("set replicas");
    let c = cluster_on(&e.proc.url(), Duration::from_secs(60)).await;
    wait_nodes(&c, 3).await;
    assert!(
        c.wait_routes(Duration::from_secs(10), |r| r.replicas("cluster-hot") == 2)
            .await
    );
    let layout = small_layout("cluster-hot");
    let data = chunks(&layout, 0..60);
    for (k, b) in &data {
        ChunkStore::put(&c, &layout, k, b.clone()).await.expect("put");
    }
    let keys: Vec<ChunkKey> = data.iter().map(|(k, _)| *k).collect();
    let routes = c.routes();
    let mut copies = vec![0; keys.len()];
    for n in &nodes {
        let held = held_by(&n.client().await, &layout, &keys).await;
        for (i, h) in held.iter().enumerate() {
            assert_eq!(
                *h,
                routes
                    .owners(&keys[i], &layout.model_id)
                    .contains(&n.url().as_str())
            );
            copies[i] += *h as usize;
        }
    }
    assert!(copies.iter().all(|&n| n == 2), "every chunk on exactly two nodes");
    // One replica dies: every chunk is still served, before and after its lease expires.
    nodes[0].kill();
    for _ in 0..2 {
        let got = ChunkStore::get_many(&c, &layout, &keys, None).await.expect("get");
        for ((_, b), g) in data.iter().zip(got) {
            assert_eq!(g.expect("served by the other replica").blob, *b);
        }
        wait_nodes(&c, 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_a_server_list_or_etcd_and_stat_shows_every_node() {
    let e = etcd();
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&e.proc.url(), &["--join-ramp-secs", "0"]))
        .collect();
    // Let the three registrations land before the CLI reads the node set.
    let c = cluster_on(&e.proc.url(), Duration::from_secs(60)).await;
    wait_nodes(&c, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = small_layout("cli-cluster");
    let kv = random_kv(&layout, 2000, 3);
    let prompt = ids(2000, 3);
    let f = kvault_tests::write_kv_file(dir.path(), "kv.safetensors", &kv, &prompt);
    let f = f.to_str().unwrap();
    let etcd_url = e.proc.url();
    // import via etcd; the layout of a KV file is given by flags.
    let o = kvault(&[
        "import",
        "--etcd",
        &etcd_url,
        "--model-id",
        "cli-cluster",
        "--file",
        f,
        "--chunk-tokens",
        "256",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("chunks=8 new=8"), "{}", stdout(&o));
    // stat over etcd: every node, their chunks add up.
    let o = kvault(&["stat", "--etcd", &etcd_url, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("json");
    let list = v["nodes"].as_array().expect("nodes");
    assert_eq!(list.len(), 3);
    assert_eq!(v["chunks"].as_u64(), Some(8));
    assert!(list.iter().all(|n| n["healthy"] == true));
    // The same servers as a static list: same placement, so export finds everything.
    let servers = nodes.iter().map(Node::url).collect::<Vec<_>>().join(",");
    let out = dir.path().join("out.safetensors");
    let o = kvault(&[
        "export",
        "--server",
        &servers,
        "--model-id",
        "cli-cluster",
        "--ids",
        f,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = kvault_client::kv_file::read(&out).expect("read export");
    assert!(back.kv.data() == kv.data());
    let o = kvault(&["stat", "--server", &servers]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(
        text.starts_with("cluster: 3 nodes (static node list), 8 chunks"),
        "{text}"
    );
    for n in &nodes {
        assert!(text.contains(&n.url()), "{text}");
    }
    // A server asked to register an address nobody can reach refuses to start.
    let d = tempfile::tempdir().unwrap();
    let r = LocalServer::start_at(d.path(), "0.0.0.0:0", &["--etcd", &etcd_url]);
    assert!(r.is_err(), "0.0.0.0 without --advertise is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_follows_the_cluster_in_etcd() {
    let e = etcd();
    let nodes: Vec<Node> = (0..2)
        .map(|_| Node::start(&e.proc.url(), &["--join-ramp-secs", "0"]))
        .collect();
    let c = cluster_on(&e.proc.url(), Duration::from_secs(60)).await;
    wait_nodes(&c, 2).await;
    let sc = TestSidecar::start(&[], &["--etcd", &e.proc.url(), "--metrics", "127.0.0.1:0"]);
    let via = sc.client().await;
    let layout = small_layout("cluster-sidecar");
    let data = chunks(&layout, 0..30);
    // The sidecar learns the node set from etcd; until then a put has nowhere to go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match via.put(&layout, &data[0].0, data[0].1.clone()).await {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "sidecar never reached the cluster: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (k, b) in &data[1..] {
        via.put(&layout, k, b.clone())
            .await
            .expect("put through the sidecar");
    }
    // Written through to the owner the client library computes.
    let keys: Vec<ChunkKey> = data.iter().map(|(k, _)| *k).collect();
    let routes = c.routes();
    for n in &nodes {
        let held = held_by(&n.client().await, &layout, &keys).await;
        for (k, h) in keys.iter().zip(held) {
            assert_eq!(h, routes.owners(k, &layout.model_id)[0] == n.url());
        }
    }
    let m = sc.proc.as_ref().unwrap().metrics.expect("metrics address");
    let text = scrape(m).await;
    assert!(text.contains("kvault_sidecar_upstream_nodes 2"), "{text}");
    assert!(
        text.contains("kvault_sidecar_upstream_membership_stale 0"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attention_over_a_prefix_spread_on_three_nodes_equals_one_server() {
    use kvault_client::attend::{AttendFormat, Offload, Request, Shard};
    let e = etcd();
    let _nodes: Vec<Node> = (0..3).map(|_| Node::start(&e.proc.url(), &[])).collect();
    let c = cluster_on(&e.proc.url(), Duration::from_secs(60)).await;
    wait_nodes(&c, 3).await;
    let single = kvault_tests::TestServer::start(&[]);
    let one = single.client().await;
    let layout = small_layout("cluster-attend");
    let tokens = 3000;
    let kv = random_kv(&layout, tokens, 11);
    let prompt = ids(tokens, 11);
    c.put_prefix(&layout, &kv.view(), &prompt, Profile::Lossless, 4)
        .await
        .expect("put");
    one.put_prefix(&layout, &kv.view(), &prompt, Profile::Lossless, 4)
        .await
        .expect("put");
    let keys = chain_keys(&layout.namespace_id(), &prompt, 256);
    let (servers, shards) = c.attend_shards(&layout, &keys).expect("shards");
    assert!(servers.len() >= 2, "12 chunks over 3 nodes land on more than one");
    assert_eq!(shards.iter().map(|s| s.chunks.len()).sum::<usize>(), keys.len());
    let mut spread = Offload::connect(&servers).await.expect("connect");
    let p = spread
        .open_prefix(&layout, &keys, tokens as usize, &shards, AttendFormat::F16)
        .await
        .expect("open across nodes");
    let mut whole = Offload::connect(std::slice::from_ref(&one))
        .await
        .expect("connect");
    let w = whole
        .open_prefix(
            &layout,
            &keys,
            tokens as usize,
            &[Shard {
                server: 0,
                chunks: 0..keys.len(),
            }],
            AttendFormat::F16,
        )
        .await
        .expect("open on one server");
    let q: Vec<f32> = (0..2 * 64)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    for layer in 0..2 {
        for range in [0..tokens as usize, 100..2900, 0..0] {
            let r = |prefix| Request {
                prefix,
                layer,
                q: &q,
                q_heads: 2,
                scale: 0.125,
                range: range.clone(),
                local: None,
            };
            let a = spread
                .attend(&[r(p)])
                .await
                .expect("attend across nodes")
                .remove(0);
            let b = whole.attend(&[r(w)]).await.expect("attend on one").remove(0);
            for (x, y) in a.o.iter().zip(&b.o) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
            for (x, y) in a.lse.iter().zip(&b.lse) {
                assert!(
                    x == y || (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "lse {x} vs {y}"
                );
            }
        }
    }
}

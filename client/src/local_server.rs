//! `kvault-server` and `kvault-sidecar` child processes, for the demo,
//! benchmarks and end-to-end tests: started on a free port, found through the address
//! it prints, stopped with SIGTERM (or killed).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use thiserror::Error;

/// Why a local server could not be started or stopped.
#[derive(Debug, Error)]
pub enum LocalServerError {
    /// A kvault binary (`kvault-server`, `kvault-sidecar`) was not found.
    #[error(
        "binary not found at {0} (build it with `cargo build --bins`, or set KVAULT_SERVER_BIN / KVAULT_SIDECAR_BIN)"
    )]
    NoBinary(PathBuf),
    /// Spawning or signalling failed.
    #[error("kvault-server process: {0}")]
    Io(#[from] std::io::Error),
    /// The process exited or stayed silent instead of printing its address.
    #[error("kvault-server did not start: {0}")]
    NotStarted(String),
}

/// A running `kvault-server` process. Killed on drop if not stopped.
pub struct LocalServer {
    child: Option<Child>,
    /// gRPC address.
    pub addr: SocketAddr,
    /// Metrics address, when started with `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// Its `--data-dir`.
    pub data_dir: PathBuf,
}

impl LocalServer {
    /// Path of the `kvault-server` binary: `$KVAULT_SERVER_BIN`, else beside
    /// the running executable (or its parent, for test executables in `deps/`).
    pub fn binary() -> Result<PathBuf, LocalServerError> {
        sibling_binary("kvault-server", "KVAULT_SERVER_BIN")
    }

    /// Starts a server on a free loopback port with `data_dir` and extra flags
    /// (e.g. `--ram-bytes 64MiB`), and waits until it listens.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<LocalServer, LocalServerError> {
        Self::start_at(data_dir, "127.0.0.1:0", extra)
    }

    /// Starts a server listening on `listen` (e.g. the address of a server
    /// that was stopped, so its clients find it again), and waits until it listens.
    pub fn start_at(data_dir: &Path, listen: &str, extra: &[&str]) -> Result<LocalServer, LocalServerError> {
        let bin = Self::binary()?;
        if !bin.is_file() {
            return Err(LocalServerError::NoBinary(bin));
        }
        let mut child = Command::new(&bin)
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            // Quiet by default: the caller's output is the point; RUST_LOG overrides.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| LocalServerError::NotStarted("no stdout".into()))?;
        let want_metrics = extra.contains(&"--metrics");
        let (tx, rx) = mpsc::channel();
        // Reads the address lines, then keeps draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut addr = None;
        let mut metrics = None;
        while addr.is_none() || (want_metrics && metrics.is_none()) {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(LocalServerError::NotStarted(format!(
                        "no address printed (exit status {status:?})"
                    )));
                }
            };
            if let Some(a) = line.strip_prefix("kvault-server listening on ") {
                addr = a.trim().parse().ok();
            } else if let Some(a) = line.strip_prefix("kvault-server metrics on http://") {
                metrics = a.trim().trim_end_matches("/metrics").parse().ok();
            }
        }
        let addr = addr.ok_or_else(|| LocalServerError::NotStarted("unparsable address".into()))?;
        Ok(LocalServer {
            child: Some(child),
            addr,
            metrics,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// `http://ADDR` for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM and waits for a graceful exit; returns whether it exited cleanly.
    pub fn stop(mut self) -> Result<bool, LocalServerError> {
        terminate(self.child.take())
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) -> Result<(), LocalServerError> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Path of a kvault binary `name`: `$env` when set, else beside the running
/// executable (or its parent, for test executables in `deps/`).
pub fn sibling_binary(name: &str, env: &str) -> Result<PathBuf, LocalServerError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(LocalServerError::NoBinary(dir.join(name)))
}

/// A running `kvault-sidecar` process (for tests, benchmarks and the demo).
/// Killed on drop if not stopped.
pub struct LocalSidecar {
    child: Option<Child>,
    /// The Unix socket it serves on.
    pub socket: PathBuf,
    /// The shared region file, when started with `--shm-bytes`.
    pub region: Option<PathBuf>,
    /// Metrics address, when started with `--metrics`.
    pub metrics: Option<SocketAddr>,
}

impl LocalSidecar {
    /// Path of the `kvault-sidecar` binary (`$KVAULT_SIDECAR_BIN`, else beside this executable).
    pub fn binary() -> Result<PathBuf, LocalServerError> {
        sibling_binary("kvault-sidecar", "KVAULT_SIDECAR_BIN")
    }

    /// Starts a sidecar in front of `upstreams` on `socket` with extra flags,
    /// and waits until it serves.
    pub fn start(
        upstreams: &[String],
        socket: &Path,
        extra: &[&str],
    ) -> Result<LocalSidecar, LocalServerError> {
        let bin = Self::binary()?;
        if !bin.is_file() {
            return Err(LocalServerError::NoBinary(bin));
        }
        let mut cmd = Command::new(&bin);
        // No upstream list: the flags name another source (`--etcd`).
        if !upstreams.is_empty() {
            cmd.arg("--upstream").arg(upstreams.join(","));
        }
        let mut child = cmd
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| LocalServerError::NotStarted("no stdout".into()))?;
        let want_region = extra.contains(&"--shm-bytes");
        let want_metrics = extra.contains(&"--metrics");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut up, mut region, mut metrics) = (false, None, None);
        while !up || (want_region && region.is_none()) || (want_metrics && metrics.is_none()) {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(LocalServerError::NotStarted(format!(
                        "kvault-sidecar printed no socket line (exit status {status:?})"
                    )));
                }
            };
            if line.starts_with("kvault-sidecar socket ") {
                up = true;
            } else if let Some(p) = line.strip_prefix("kvault-sidecar region ") {
                region = Some(PathBuf::from(p.trim()));
            } else if let Some(a) = line.strip_prefix("kvault-sidecar metrics on http://") {
                metrics = a.trim().trim_end_matches("/metrics").parse().ok();
            }
        }
        Ok(LocalSidecar {
            child: Some(child),
            socket: socket.to_path_buf(),
            region,
            metrics,
        })
    }

    /// `unix:PATH` for clients.
    pub fn url(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// Sends SIGTERM and waits for a graceful exit; returns whether it exited cleanly.
    pub fn stop(mut self) -> Result<bool, LocalServerError> {
        terminate(self.child.take())
    }
}

impl Drop for LocalSidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A single-member etcd (Debian's `etcd-server`) on free loopback ports, for
/// cluster tests and benchmarks. Killed on drop if not stopped.
pub struct LocalEtcd {
    child: Option<Child>,
    /// Client port.
    pub client_port: u16,
    peer_port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
}

/// A port that was free a moment ago (etcd picks no port of its own).
fn free_port() -> Result<u16, LocalServerError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalEtcd {
    /// Path of the etcd binary: `$KVAULT_ETCD_BIN`, else `etcd` on `PATH`
    /// (`scripts/deps.sh etcd-server` installs it).
    pub fn binary() -> Result<PathBuf, LocalServerError> {
        if let Some(p) = std::env::var_os("KVAULT_ETCD_BIN") {
            return Ok(PathBuf::from(p));
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
            .ok_or_else(|| LocalServerError::NoBinary(PathBuf::from("etcd (apt-get install etcd-server)")))
    }

    /// Starts etcd with its data in `data_dir` and waits until it answers.
    pub fn start(data_dir: &Path) -> Result<LocalEtcd, LocalServerError> {
        let (client_port, peer_port) = (free_port()?, free_port()?);
        Self::start_on(data_dir, client_port, peer_port)
    }

    fn start_on(data_dir: &Path, client_port: u16, peer_port: u16) -> Result<LocalEtcd, LocalServerError> {
        let bin = Self::binary()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new(&bin)
            .arg("--name=kvault-test")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=kvault-test={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut e = LocalEtcd {
            child: Some(child),
            client_port,
            peer_port,
            data_dir: data_dir.to_path_buf(),
        };
        e.wait_ready()?;
        Ok(e)
    }

    /// Waits until the client port answers HTTP health (etcd serves `/health` there).
    fn wait_ready(&mut self) -> Result<(), LocalServerError> {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                return Err(LocalServerError::NotStarted(format!("etcd exited with {status}")));
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.client_port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                if body.contains("\"health\":\"true\"") {
                    return Ok(());
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(LocalServerError::NotStarted(
                    "etcd did not become healthy in 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT` for clients.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL), as a crash or a partition would look to clients.
    pub fn kill(&mut self) -> Result<(), LocalServerError> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts a killed etcd again on the same ports and data.
    pub fn restart(&mut self) -> Result<(), LocalServerError> {
        self.kill()?;
        let e = Self::start_on(&self.data_dir.clone(), self.client_port, self.peer_port)?;
        *self = e;
        Ok(())
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM to a child we started and waits (up to 10 s) for a graceful exit, then
/// kills it; returns whether it exited cleanly (true when there was no child).
fn terminate(child: Option<std::process::Child>) -> Result<bool, LocalServerError> {
    let Some(mut child) = child else {
        return Ok(true);
    };
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    for _ in 0..200 {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(false)
}

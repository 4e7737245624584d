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
        let mut child = Command::new(&bin)
            .arg("--upstream")
            .arg(upstreams.join(","))
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

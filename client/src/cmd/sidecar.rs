//! `kvault sidecar ...`: runs the `kvault-sidecar` binary with the same
//! arguments.
//!
//! The sidecar is its own crate (it builds on the server's tier code, and the
//! server crate must not pull in the client's CLI): this command finds the
//! binary next to `kvault` (or through `KVAULT_SIDECAR_BIN`) and replaces
//! the current process with it, so signals and exit codes are the sidecar's.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use anyhow::Context;
use clap::Args;
use kvault_client::local_server::LocalSidecar;

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct SidecarArgs {
    /// Arguments for kvault-sidecar (see `kvault sidecar --help`): --upstream URL[,URL...] --socket PATH
    /// --ram-bytes N [--shm PATH --shm-bytes N] ...
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

pub fn run(a: SidecarArgs) -> anyhow::Result<()> {
    let bin = LocalSidecar::binary().context("finding kvault-sidecar")?;
    let err = std::process::Command::new(&bin).args(&a.args).exec();
    Err(err).with_context(|| format!("running {}", bin.display()))
}

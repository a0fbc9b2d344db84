//! The remote backend against real `rollbox serve` servers on loopback: the local provisioner
//! starts the real binary (`CARGO_BIN_EXE_rollbox`), and tests kill, restart and overload
//! those servers. Where a real server cannot misbehave on cue (a hang, a 500), a scripted
//! loopback server stands in; the tests that use one say so.

use std::sync::Arc;
use std::time::Duration;

use rollbox::remote::provision::{LocalProvisioner, LocalProvisionerConfig};
use rollbox::remote::{PoolConfig, RemoteBackend};
use rollbox::Backend;

use crate::conformance;

/// Generous: only there so a broken test fails instead of hanging.
const NO_HANG: Duration = Duration::from_secs(300);

fn local_provisioner(server_args: &[&str]) -> Arc<LocalProvisioner> {
    let mut config = LocalProvisionerConfig::new(env!("CARGO_BIN_EXE_rollbox"));
    config.server_args = server_args.iter().map(|a| a.to_string()).collect();
    Arc::new(LocalProvisioner::new(config))
}

async fn local_backend(pool: PoolConfig, server_args: &[&str]) -> (RemoteBackend, Arc<LocalProvisioner>) {
    let provisioner = local_provisioner(server_args);
    let backend = RemoteBackend::with_provisioner(pool, provisioner.clone()).await.unwrap_or_else(|e| panic!("the remote backend starts: {e:?}"));
    (backend, provisioner)
}

fn pool(slots_per_server: usize, min_servers: usize, max_servers: usize) -> PoolConfig {
    PoolConfig { slots_per_server, min_servers, max_servers, ..PoolConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_passes_the_conformance_suite() {
    let (backend, _) = local_backend(pool(2, 1, 2), &[]).await;
    assert_eq!(backend.name(), "remote");
    assert!(backend.tools().iter().any(|t| t.as_str() == "python"), "the tools come from the servers: {:?}", backend.tools());
    tokio::time::timeout(NO_HANG, conformance::run_all(&backend)).await.expect("the suite finishes");
    backend.shutdown().await.expect("shutdown");
}

//! Where a [`super::RemoteBackend`]'s servers come from: a small [`Provisioner`] trait and its
//! three implementations, [`local`] (child processes on loopback), [`listed`] (a fixed list of
//! URLs) and [`modal`] (Modal sandboxes, through a Python helper); and [`per_image`], which
//! puts one backend per container image behind one (each SWE task's sandbox from its image).

pub mod listed;
pub mod local;
pub mod modal;
pub mod per_image;

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

pub use listed::ListedProvisioner;
pub use local::{LocalProvisioner, LocalProvisionerConfig};
pub use modal::{ModalConfig, ModalProvisioner};
pub use per_image::{PerImageBackend, PerImageError};

pub use super::client::ServerEndpoint;

/// A provisioner could not start, list or stop servers.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A server process could not be started.
    #[error("failed to start `{command}`")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A server process ended, or said nothing usable, before it was listening.
    #[error("failed to start server {server}: {reason}; its last stderr lines:\n{stderr}")]
    NotListening {
        /// The server's name.
        server: String,
        /// What happened.
        reason: String,
        /// The end of what it printed on stderr.
        stderr: String,
    },
    /// Every server the provisioner can hand out is in use.
    #[error(
        "no more servers: all {listed} listed servers are in use; list more with --servers or raise --slots-per-sandbox"
    )]
    NoMoreServers {
        /// How many servers are listed.
        listed: usize,
    },
    /// The Modal helper failed or answered with an error.
    #[error("the Modal helper failed to {action}: {message}")]
    Helper {
        /// What it was asked to do.
        action: String,
        /// What it said, or what went wrong talking to it.
        message: String,
    },
    /// A new server never became healthy.
    #[error("failed to reach the new server {server}")]
    NotReady {
        /// The server.
        server: String,
        /// Why.
        #[source]
        source: crate::remote::client::ClientError,
    },
    /// The operating system's randomness could not be read for a server token.
    #[error("failed to read random bytes for a server token")]
    Random(#[source] std::io::Error),
    /// A server could not be stopped.
    #[error("failed to stop server {server}")]
    Stop {
        /// The server.
        server: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A source of servers for the remote backend. Object-safe.
///
/// The backend asks for servers when it needs room for slots, and hands each back with
/// [`Provisioner::terminate`] once its last slot is released (beyond the warm minimum) or it
/// is lost. [`Provisioner::shutdown`] ends everything; implementations also clean up when
/// dropped, so a caller that forgets to shut down leaks nothing it could have stopped.
#[async_trait::async_trait]
pub trait Provisioner: Send + Sync {
    /// The provisioner's short name (`local`, `listed`, `modal`).
    fn name(&self) -> &str;

    /// The most servers it can hand out at once, if it has a fixed supply (default: none).
    fn limit(&self) -> Option<usize> {
        None
    }

    /// Whether [`Provisioner::terminate`] ends the server (and every slot on it); the default.
    /// When it does not (a listed server lives on), the backend releases its slots there
    /// itself on shutdown.
    fn owns_servers(&self) -> bool {
        true
    }

    /// Starts (or hands out) `count` servers, each ready to answer. All or nothing: on error,
    /// any server it had started for this call is stopped again.
    async fn provision(&self, count: usize) -> Result<Vec<ServerEndpoint>, ProvisionError>;

    /// Stops a server it handed out (or takes it back).
    async fn terminate(&self, server: &ServerEndpoint) -> Result<(), ProvisionError>;

    /// Stops every server it handed out.
    async fn shutdown(&self) -> Result<(), ProvisionError>;
}

/// A fresh bearer token: 24 random bytes from the operating system, as hex.
pub(crate) fn random_token() -> Result<String, ProvisionError> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(ProvisionError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// How many of a child's last stderr lines are kept for error messages.
const STDERR_TAIL_LINES: usize = 30;

/// The last lines a child process wrote on stderr, kept for error messages; every line also
/// goes to the `tracing` log at debug level.
#[derive(Default)]
pub(crate) struct StderrTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl StderrTail {
    /// Reads `stream` to its end in a background task.
    pub(crate) fn follow(stream: impl AsyncRead + Unpin + Send + 'static, who: String) -> StderrTail {
        let lines: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let kept_lines = lines.clone();
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                tracing::debug!(child = %who, "{line}");
                let mut kept = kept_lines.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() == STDERR_TAIL_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        StderrTail {
            lines,
            reader: Mutex::new(Some(reader)),
        }
    }

    /// The kept lines once the child has exited: waits briefly for the reader to reach the
    /// end of the stream, so the child's last words are included.
    pub(crate) async fn text_after_exit(&self) -> String {
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reader) = reader {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), reader).await;
        }
        let kept = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if kept.is_empty() {
            "(nothing)".to_string()
        } else {
            kept.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 48);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn endpoints_never_show_their_token() {
        let endpoint = ServerEndpoint {
            id: "s".into(),
            url: "http://x".into(),
            token: Some("secret".into()),
        };
        assert!(!format!("{endpoint:?} {endpoint}").contains("secret"));
    }
}

//! Per-task environments: the repository's own dependencies (a venv with them installed, say),
//! built once per (repo, setup commit, setup commands) in the backend's shared cache, and handed
//! to every slot of that repository version ready made.
//!
//! The build runs on the machine that runs the slots, outside any sandbox, because installing
//! dependencies needs the network and a bubblewrapped slot has none. `rollbox swe prepare` calls
//! [`ensure_environments`] ahead of time; `rollbox rollout --backend process` calls it before the
//! first trajectory. A slot's [`super::prepare`] then only links the ready folder (and fails
//! with a clear error when it was never built).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{SweError, SweTask, repo};
use crate::env_vars;
use crate::process::SANDBOX_PATH;

/// The folder of environments inside the shared cache.
pub(crate) const ENVIRONMENTS_SUBDIR: &str = "swe-envs";
/// Inside an environment's folder: the environment itself (`bin/` goes first on a slot's `PATH`).
pub(crate) const ENV_DIR: &str = "env";
/// Inside an environment's folder: the repository checked out at the setup commit, where the
/// setup commands run (so they can read `requirements.txt`, `pyproject.toml`).
const CHECKOUT_DIR: &str = "repo";
/// Written last, when every setup command succeeded: an environment without it is rebuilt.
pub(crate) const READY_FILE: &str = "READY";
/// How much of a failed setup command's output the error keeps.
const OUTPUT_TAIL_BYTES: usize = 4_000;

/// What an environment is built from; two tasks with the same spec share one environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvironmentSpec {
    /// The repository, as the task names it (a URL, or a path on this machine).
    pub repo: String,
    /// The commit the setup commands run at.
    pub setup_commit: String,
    /// The setup commands, run in order with `bash -c`.
    pub commands: Vec<String>,
}

impl EnvironmentSpec {
    /// The environment's folder name: readable (the repository's name and the commit's first
    /// characters) and unique per spec (a hash of all three parts).
    pub fn key(&self) -> String {
        let mut hasher = Sha256::new();
        for part in [self.repo.as_str(), self.setup_commit.as_str()]
            .into_iter()
            .chain(self.commands.iter().map(String::as_str))
        {
            hasher.update(part.len().to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let digest: String = hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        let name = self
            .repo
            .trim_end_matches('/')
            .rsplit(['/', ':'])
            .next()
            .unwrap_or("repo");
        let name: String = name
            .trim_end_matches(".git")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .take(40)
            .collect();
        let commit: String = self
            .setup_commit
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(10)
            .collect();
        format!("{name}-{commit}-{digest}")
    }
}

/// The folder of `spec`'s environment under a shared cache.
pub fn environment_dir(shared_cache: &Path, spec: &EnvironmentSpec) -> PathBuf {
    shared_cache.join(ENVIRONMENTS_SUBDIR).join(spec.key())
}

/// Told about each environment [`ensure_environments`] looks at. Libraries never print: the CLI
/// draws this.
pub trait EnvironmentReporter: Sync {
    /// Environment `index` (1-based) of `total` is being built (it was not in the cache).
    fn on_build_start(&self, key: &str, index: usize, total: usize);
    /// Environment `index` of `total` is ready: `built` says whether it was built now (else it
    /// was in the cache), `elapsed` how long it took, waiting for another builder's lock included.
    fn on_ready(&self, key: &str, index: usize, total: usize, built: bool, elapsed: Duration);
}

/// A reporter that reports nothing.
pub struct SilentEnvironmentReporter;

impl EnvironmentReporter for SilentEnvironmentReporter {
    fn on_build_start(&self, _: &str, _: usize, _: usize) {}
    fn on_ready(&self, _: &str, _: usize, _: usize, _: bool, _: Duration) {}
}

/// What [`ensure_environments`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnvironmentsPrepared {
    /// Environments built now.
    pub built: usize,
    /// Environments found ready in the cache.
    pub reused: usize,
}

/// Makes sure every distinct environment of `tasks` is ready in `shared_cache`, one after the
/// other (a build is mostly `pip`, which uses the network and the disk, not the cores).
pub fn ensure_environments<'a>(
    shared_cache: &Path,
    tasks: impl IntoIterator<Item = &'a SweTask>,
    reporter: &dyn EnvironmentReporter,
) -> Result<EnvironmentsPrepared, SweError> {
    let mut specs: Vec<EnvironmentSpec> = Vec::new();
    for spec in tasks.into_iter().filter_map(SweTask::environment) {
        if !specs.contains(&spec) {
            specs.push(spec);
        }
    }
    let mut prepared = EnvironmentsPrepared::default();
    for (index, spec) in specs.iter().enumerate() {
        let started = Instant::now();
        let key = spec.key();
        let built = ensure_environment(shared_cache, spec, &mut || {
            reporter.on_build_start(&key, index + 1, specs.len())
        })?;
        reporter.on_ready(&key, index + 1, specs.len(), built, started.elapsed());
        match built {
            true => prepared.built += 1,
            false => prepared.reused += 1,
        }
    }
    Ok(prepared)
}

/// Builds `spec`'s environment in `shared_cache` unless it is there already; returns whether it
/// built it. Concurrent callers (threads or processes) wait on a file lock and build it once.
///
/// The build: the repository is cloned and checked out at the setup commit in `repo/`, then each
/// setup command runs there with `bash -c`, with `ROLLBOX_SWE_ENV` set to `env/` (where the
/// commands put the environment, `python3 -m venv "$ROLLBOX_SWE_ENV"` for one) and `env/bin`
/// first on a `PATH` that is otherwise the sandbox's, so the environment is made from the
/// Python the slots see. The environment is built in place, since a venv cannot be moved, and
/// marked ready last; an unfinished one is removed and built again.
pub fn ensure_environment(
    shared_cache: &Path,
    spec: &EnvironmentSpec,
    on_build_start: &mut dyn FnMut(),
) -> Result<bool, SweError> {
    // The commands run in the checkout, so a relative cache path would point elsewhere there.
    let shared_cache = &std::path::absolute(shared_cache).map_err(|e| SweError::io("resolve", shared_cache, e))?;
    let dir = environment_dir(shared_cache, spec);
    let parent = shared_cache.join(ENVIRONMENTS_SUBDIR);
    std::fs::create_dir_all(&parent).map_err(|e| SweError::io("create", &parent, e))?;
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| SweError::io("create", &lock_path, e))?;
    lock.lock().map_err(|e| SweError::io("lock", &lock_path, e))?;
    if dir.join(READY_FILE).is_file() {
        return Ok(false);
    }
    on_build_start();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| SweError::io("remove the unfinished environment", &dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| SweError::io("create", &dir, e))?;
    let checkout = dir.join(CHECKOUT_DIR);
    repo::clone_at(&spec.repo, &spec.setup_commit, &checkout)?;
    let env = dir.join(ENV_DIR);
    let path = format!("{}:{SANDBOX_PATH}", env.join("bin").display());
    for command in &spec.commands {
        run_setup_command(&spec.key(), command, &checkout, &env, &path)?;
    }
    let ready = dir.join(READY_FILE);
    let record = serde_json::json!({
        "repo": spec.repo, "setup_commit": spec.setup_commit, "commands": spec.commands,
    });
    std::fs::write(&ready, format!("{record:#}\n")).map_err(|e| SweError::io("write", &ready, e))?;
    Ok(true)
}

fn run_setup_command(key: &str, command: &str, checkout: &Path, env: &Path, path: &str) -> Result<(), SweError> {
    let output = Command::new("bash")
        .args(["-c", command])
        .current_dir(checkout)
        .env(env_vars::SWE_ENV, env)
        .env(env_vars::PATH, path)
        .env_remove(env_vars::VIRTUAL_ENV)
        .env_remove(env_vars::PYTHONPATH)
        .output()
        .map_err(|e| SweError::io("run bash for the environment in", checkout, e))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let start = text.len().saturating_sub(OUTPUT_TAIL_BYTES);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    Err(SweError::EnvironmentSetup {
        key: key.to_owned(),
        command: command.to_owned(),
        status: output.status.to_string(),
        output: text[start..].trim_end().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(commands: &[&str]) -> EnvironmentSpec {
        EnvironmentSpec {
            repo: "/srv/repos/inflection.git".to_owned(),
            setup_commit: "0123456789abcdef".to_owned(),
            commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn keys_name_the_repository_and_commit_and_differ_per_command_list() {
        let a = spec(&["python3 -m venv \"$ROLLBOX_SWE_ENV\"", "pip install pytest"]);
        assert!(a.key().starts_with("inflection-0123456789-"), "{}", a.key());
        assert_eq!(a.key(), a.clone().key());
        assert_ne!(a.key(), spec(&["python3 -m venv \"$ROLLBOX_SWE_ENV\""]).key());
        // The parts are length-prefixed, so moving text between commands changes the key.
        assert_ne!(spec(&["ab", "c"]).key(), spec(&["a", "bc"]).key());
    }
}

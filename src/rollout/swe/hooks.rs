//! The three SWE hooks, each one or two `bash` calls through the backend, so they work the same
//! on `process` and on `remote`.

use std::path::Path;

use base64::Engine;
use sha2::{Digest, Sha256};

use super::{SweError, SweScore, SweTask, repo};
use crate::env_vars;
use crate::slot::{Backend, ErrorKind, ExecutionResult, Slot, ToolCall};

/// The folder of bare repositories inside the slot's shared cache.
const CACHE_SUBDIR: &str = "swe-repos";
/// The largest bundle shipped into a slot (as base64 text through `write_file`, since a command
/// line is limited to 128 KiB).
const MAX_BUNDLE_BYTES: u64 = 16 << 20;
/// Where the bundle's base64 waits in the workspace until the setup script unpacks it.
const STAGED_BUNDLE: &str = ".rollbox-swe-bundle.b64";

/// Makes the slot's (empty) workspace a git worktree of `task.repo` at `task.base_commit`.
///
/// The repository's bare clone lives in the slot's shared cache, made by the first slot that
/// needs it and reused by the rest, under a `flock` so concurrent slots clone once. A repository
/// that is a path on this machine is shipped as a git bundle, staged in the workspace with
/// `write_file` and unpacked into the cache by the setup script.
pub async fn prepare(backend: &dyn Backend, slot: &Slot, task: &SweTask) -> Result<(), SweError> {
    let source = match local_repository(&task.repo) {
        Some(path) => {
            let staged = serde_json::json!({ "path": STAGED_BUNDLE, "content": bundle_base64(path)? });
            expect_success(
                backend.execute(slot, ToolCall::new("write_file", staged)).await,
                "ship the repository",
                task,
            )?;
            RepoSource::Bundle
        }
        None => RepoSource::Url(task.repo.clone()),
    };
    let script = prepare_script(&cache_key(&task.repo), &task.base_commit, &source);
    let result = backend.execute(slot, bash(script)).await;
    expect_success(result, "set up the workspace", task).map(drop)
}

/// Restores the task's test files from the base commit, runs its test command in the workspace,
/// and scores it: 1.0 when it exits 0, else 0.0. A failing or timed-out test run is a score;
/// a slot that cannot run it at all is an error.
pub async fn verify(backend: &dyn Backend, slot: &Slot, task: &SweTask) -> Result<SweScore, SweError> {
    if !task.test_files.is_empty() {
        let files: Vec<String> = task.test_files.iter().map(|f| quote(f)).collect();
        let restore = format!(
            "git checkout --quiet {} -- {}",
            quote(&task.base_commit),
            files.join(" ")
        );
        expect_success(
            backend.execute(slot, bash(restore)).await,
            "restore the test files",
            task,
        )?;
    }
    let result = backend.execute(slot, bash(task.test_command.clone())).await;
    let scored = match result.error.as_ref().map(|e| e.kind) {
        None | Some(ErrorKind::NonZeroExit) | Some(ErrorKind::LimitExceeded) => true,
        Some(_) => false,
    };
    if !scored {
        return Err(hook_error("run the tests", task, &result));
    }
    let reward = if result.success { 1.0 } else { 0.0 };
    Ok(SweScore {
        reward,
        exit_code: result.metadata.exit_code,
        output: result.output,
    })
}

/// Removes the slot's worktree from the cached repository and empties the workspace. Call it
/// just before `release`: the workspace folder is deleted and made again, so the slot's open
/// interpreter, if any, is left in a folder that no longer exists.
///
/// Only this slot's worktree is touched: `git worktree prune` is never run, because a slot
/// cannot see the other slots' workspaces and would unregister all of them.
pub async fn cleanup(backend: &dyn Backend, slot: &Slot, task: &SweTask) -> Result<(), SweError> {
    let script = cleanup_script(&cache_key(&task.repo));
    expect_success(backend.execute(slot, bash(script)).await, "remove the worktree", task).map(drop)
}

/// Where a task's repository comes from, as the slot sees it.
enum RepoSource {
    /// `git clone` it from here.
    Url(String),
    /// Unpack the bundle staged at [`STAGED_BUNDLE`] and clone from it.
    Bundle,
}

fn bash(command: String) -> ToolCall {
    ToolCall::new("bash", serde_json::json!({ "command": command }))
}

fn expect_success(result: ExecutionResult, step: &'static str, task: &SweTask) -> Result<ExecutionResult, SweError> {
    match result.success {
        true => Ok(result),
        false => Err(hook_error(step, task, &result)),
    }
}

fn hook_error(step: &'static str, task: &SweTask, result: &ExecutionResult) -> SweError {
    SweError::Hook {
        step,
        instance_id: task.instance_id.clone(),
        message: result.output.trim_end().to_string(),
    }
}

/// The repository's folder name in the cache: readable, and unique per `repo` string.
fn cache_key(repo: &str) -> String {
    let tail = repo.trim_end_matches('/').rsplit(['/', ':']).next().unwrap_or("repo");
    let tail = tail.strip_suffix(".git").unwrap_or(tail);
    let readable: String = tail
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(40)
        .collect();
    let digest = Sha256::digest(repo.as_bytes());
    let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{readable}-{short}")
}

/// `repo` as a local path, when it is one that exists on this machine.
fn local_repository(repo: &str) -> Option<&Path> {
    let path = Path::new(repo);
    (path.is_absolute() && path.exists()).then_some(path)
}

fn bundle_base64(repo_path: &Path) -> Result<String, SweError> {
    let file = tempfile_path("rollbox-swe-bundle");
    let bundled = repo::bundle(repo_path, &file).and_then(|()| {
        let bytes = std::fs::read(&file).map_err(|e| SweError::Io {
            op: "read",
            path: file.clone(),
            source: e,
        })?;
        if bytes.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(SweError::TooLarge {
                path: repo_path.to_path_buf(),
                bytes: bytes.len() as u64,
                limit: MAX_BUNDLE_BYTES,
            });
        }
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    });
    let _ = std::fs::remove_file(&file);
    bundled
}

fn tempfile_path(prefix: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{}.bundle",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The shell's single-quoted form of `text`.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The lines that set `bare` to the cached repository's path and take the cache lock on fd 9.
fn locked_cache_prelude(key: &str) -> String {
    let cache = env_vars::SHARED_CACHE;
    format!(
        "set -euo pipefail\n\
         : \"${{{cache}:?this slot has no shared cache folder; SWE tasks need the process backend, directly or behind rollbox serve}}\"\n\
         cache=\"${cache}/{CACHE_SUBDIR}\"\n\
         bare=\"$cache/{key}.git\"\n\
         workspace=\"$PWD\"\n\
         mkdir -p \"$cache\"\n\
         exec 9>\"$bare.lock\"\n\
         flock 9\n"
    )
}

fn prepare_script(key: &str, commit: &str, source: &RepoSource) -> String {
    let commit = quote(&format!("{commit}^{{commit}}"));
    let fetch_source = match source {
        RepoSource::Url(url) => format!("source={}\n", quote(url)),
        RepoSource::Bundle => "source=\"$bare.bundle\"\nbase64 -d \"$staged\" > \"$source\"\n".to_string(),
    };
    format!(
        "{prelude}\
         staged=\"$workspace/{STAGED_BUNDLE}\"\n\
         trap 'rm -f \"$staged\"' EXIT\n\
         if ! git -C \"$bare\" cat-file -e {commit} 2>/dev/null; then\n\
         {fetch_source}\
         if [ -d \"$bare\" ]; then\n\
         git -C \"$bare\" fetch --quiet \"$source\" '+refs/heads/*:refs/heads/*' '+refs/tags/*:refs/tags/*'\n\
         else\n\
         rm -rf \"$bare.partial\"\n\
         git clone --quiet --bare --no-hardlinks \"$source\" \"$bare.partial\"\n\
         git -C \"$bare.partial\" config gc.worktreePruneExpire never\n\
         mv \"$bare.partial\" \"$bare\"\n\
         fi\n\
         rm -f \"$bare.bundle\"\n\
         fi\n\
         rm -f \"$staged\"\n\
         git -C \"$bare\" worktree add --quiet --detach \"$workspace\" {commit}\n\
         flock -u 9\n\
         git -C \"$workspace\" rev-parse HEAD\n",
        prelude = locked_cache_prelude(key),
    )
}

fn cleanup_script(key: &str) -> String {
    format!(
        "{prelude}\
         cd /\n\
         git -C \"$bare\" worktree remove --force \"$workspace\" 2>/dev/null || true\n\
         for registration in \"$bare\"/worktrees/*/; do\n\
         if [ \"$(cat \"${{registration}}gitdir\" 2>/dev/null)\" = \"$workspace/.git\" ]; then rm -rf \"$registration\"; fi\n\
         done\n\
         flock -u 9\n\
         mkdir -p \"$workspace\"\n\
         find \"$workspace\" -mindepth 1 -delete\n",
        prelude = locked_cache_prelude(key),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_are_readable_and_unique_per_repository() {
        let a = cache_key("https://example.invalid/owner/calc.git");
        let b = cache_key("/srv/repos/calc.git");
        assert!(a.starts_with("calc-") && b.starts_with("calc-"), "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(a, cache_key("https://example.invalid/owner/calc.git"));
        assert!(
            cache_key("git@host:o/$(rm -rf)'x")
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        );
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}

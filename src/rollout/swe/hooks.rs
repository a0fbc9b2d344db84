//! The three SWE hooks, each one or two `bash` calls through the backend, so they work the same
//! on `process` and on `remote`.

use std::path::Path;

use base64::Engine;
use sha2::{Digest, Sha256};

use super::environment::{ENV_DIR, ENVIRONMENTS_SUBDIR, READY_FILE};
use super::swe_bench::{parse_pytest_report, patched_files, score_tests};
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
/// Where the test patch waits in the workspace until `verify` applies it.
const STAGED_TEST_PATCH: &str = ".rollbox-swe-test.patch";
/// The line between a per-test run's summary lines and the end of its log.
const LOG_TAIL_MARK: &str = "--- the end of the test log ---";
/// How much of a per-test run's log `verify` keeps after the summary lines.
const LOG_TAIL_BYTES: usize = 4_000;

/// Makes the slot's (empty) workspace a git worktree of `task.repo` at `task.base_commit`, and
/// links the task's ready environment, if it has one, where the slot's `PATH` looks first.
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
    let env_key = task.environment().map(|spec| spec.key());
    let script = prepare_script(&cache_key(&task.repo), &task.base_commit, &source, env_key.as_deref());
    let result = backend.execute(slot, bash(script)).await;
    expect_success(result, "set up the workspace", task).map(drop)
}

/// Scores the slot's workspace: the task's test files are restored from the base commit, its
/// test patch (if any) is applied over the agent's changes, and its test command runs. A
/// per-test task ([`SweTask::scored_per_test`]) scores 1.0 when every FAIL_TO_PASS id passes
/// and no PASS_TO_PASS id breaks, with each id's outcome kept; any other scores 1.0 when the
/// command exits 0. A failing or timed-out test run is a score; a slot that cannot run it at
/// all is an error.
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
    if let Some(patch) = &task.test_patch {
        apply_test_patch(backend, slot, task, patch).await?;
    }
    let command = match task.scored_per_test() {
        true => per_test_command(&task.test_command),
        false => task.test_command.clone(),
    };
    let result = backend.execute(slot, bash(command)).await;
    let scored = match result.error.as_ref().map(|e| e.kind) {
        None | Some(ErrorKind::NonZeroExit) | Some(ErrorKind::LimitExceeded) => true,
        Some(_) => false,
    };
    if !scored {
        return Err(hook_error("run the tests", task, &result));
    }
    if !task.scored_per_test() {
        let reward = if result.success { 1.0 } else { 0.0 };
        return Ok(SweScore {
            reward,
            exit_code: result.metadata.exit_code,
            output: result.output,
            tests: Vec::new(),
        });
    }
    let report = parse_pytest_report(&result.output);
    let tests = score_tests(&task.fail_to_pass, &task.pass_to_pass, &report);
    let reward = if tests.iter().all(|t| t.status.passes()) {
        1.0
    } else {
        0.0
    };
    Ok(SweScore {
        reward,
        exit_code: result.metadata.exit_code,
        output: result.output,
        tests,
    })
}

/// Puts every file the test patch touches back as it was at the base commit (a file the patch
/// adds is removed), so the agent's edits to tests do not count, then applies the patch. The
/// patch travels with `write_file`, since a command line is limited to 128 KiB.
async fn apply_test_patch(backend: &dyn Backend, slot: &Slot, task: &SweTask, patch: &str) -> Result<(), SweError> {
    let staged = serde_json::json!({ "path": STAGED_TEST_PATCH, "content": patch });
    expect_success(
        backend.execute(slot, ToolCall::new("write_file", staged)).await,
        "stage the test patch",
        task,
    )?;
    let base = quote(&task.base_commit);
    let mut script = String::from("set -euo pipefail\n");
    for file in patched_files(patch) {
        let file = quote(&file);
        script.push_str(&format!(
            "if git cat-file -e {base}:{file} 2>/dev/null; then git checkout --quiet {base} -- {file}; else rm -rf -- {file}; fi\n"
        ));
    }
    script.push_str(&format!(
        "git apply --whitespace=nowarn {STAGED_TEST_PATCH}\nrm -f {STAGED_TEST_PATCH}\n"
    ));
    expect_success(backend.execute(slot, bash(script)).await, "apply the test patch", task).map(drop)
}

/// `test_command` with its whole log kept in the slot's temporary folder, printing pytest's
/// summary lines (every test id's status) first and then the end of the log, so a long log
/// cut at the output limit never loses a test's status; exits with the command's status.
fn per_test_command(test_command: &str) -> String {
    format!(
        "log=\"${{TMPDIR:-/tmp}}/rollbox-swe-tests.log\"\n\
         {{\n{test_command}\n}} > \"$log\" 2>&1 && code=0 || code=$?\n\
         grep -E '^(PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED) ' \"$log\" || true\n\
         echo {mark}\n\
         tail -c {LOG_TAIL_BYTES} \"$log\"\n\
         exit \"$code\"\n",
        mark = quote(LOG_TAIL_MARK),
    )
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

fn prepare_script(key: &str, commit: &str, source: &RepoSource, env_key: Option<&str>) -> String {
    let commit = quote(&format!("{commit}^{{commit}}"));
    let link_env = env_key.map(link_environment_script).unwrap_or_default();
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
         {link_env}\
         git -C \"$workspace\" rev-parse HEAD\n",
        prelude = locked_cache_prelude(key),
    )
}

/// Links the ready environment `env_key` at the slot's `ROLLBOX_SLOT_ENV` (whose `bin/` is
/// first on the slot's `PATH`), or fails saying how to build it.
fn link_environment_script(env_key: &str) -> String {
    let cache = env_vars::SHARED_CACHE;
    let slot_env = env_vars::SLOT_ENV;
    format!(
        ": \"${{{slot_env}:?this slot has no place for an environment; its server runs an older rollbox}}\"\n\
         environment=\"${cache}/{ENVIRONMENTS_SUBDIR}/{env_key}\"\n\
         if [ ! -f \"$environment/{READY_FILE}\" ]; then\n\
         echo \"the environment {env_key} is not built in this backend's shared cache ($environment); build it first with \
         'rollbox swe prepare --dataset FILE --shared-cache DIR' on the machine the slots run on, with the same shared cache\" >&2\n\
         exit 3\n\
         fi\n\
         ln -sfn \"$environment/{ENV_DIR}\" \"${slot_env}\"\n"
    )
}

fn cleanup_script(key: &str) -> String {
    let slot_env = env_vars::SLOT_ENV;
    format!(
        "{prelude}\
         cd /\n\
         git -C \"$bare\" worktree remove --force \"$workspace\" 2>/dev/null || true\n\
         for registration in \"$bare\"/worktrees/*/; do\n\
         if [ \"$(cat \"${{registration}}gitdir\" 2>/dev/null)\" = \"$workspace/.git\" ]; then rm -rf \"$registration\"; fi\n\
         done\n\
         flock -u 9\n\
         if [ -L \"${{{slot_env}:-}}\" ]; then rm -f \"${slot_env}\"; fi\n\
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

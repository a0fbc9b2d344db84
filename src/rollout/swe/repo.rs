//! Git repositories on the client's machine: the example repository built deterministically
//! from a folder of plain files, and the bundle a local repository is shipped into a slot as.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::SweError;
use crate::env_vars;

/// The example repository's fixed author and committer, so its commit id is the same on every
/// machine and with every git version.
const AUTHOR_NAME: &str = "rollbox examples";
const AUTHOR_EMAIL: &str = "examples@rollbox.invalid";
/// 2026-01-01T00:00:00Z, in git's internal date format.
const COMMIT_DATE: &str = "1767225600 +0000";
/// The branch the built repository's one commit is on.
const BRANCH: &str = "refs/heads/main";
/// Folders and files that tools leave next to sources and that never belong in the repository.
const SKIPPED: [&str; 4] = [".git", "__pycache__", ".pytest_cache", ".mypy_cache"];

/// Builds a bare repository at `dest` whose one commit, on `main`, holds the files under
/// `source` (caches and `.pyc` files skipped, every file mode 100644), with a fixed author,
/// committer, date and `message`; returns the commit id. The same files always give the same
/// id, so a dataset can name it as its `base_commit`. A `dest` that already holds that commit
/// is kept; any other is replaced.
pub fn build_repo(source: &Path, dest: &Path, message: &str) -> Result<String, SweError> {
    let files = source_files(source)?;
    let partial = dest.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    if let Some(parent) = partial.parent() {
        std::fs::create_dir_all(parent).map_err(|e| SweError::io("create", parent, e))?;
    }
    let built = commit_files(source, &partial, &files, message);
    let commit = match built {
        Ok(commit) => commit,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(error);
        }
    };
    if head_of(dest).as_deref() == Some(commit.as_str()) {
        let _ = std::fs::remove_dir_all(&partial);
        return Ok(commit);
    }
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&partial, dest).map_err(|e| SweError::io("move the built repository to", dest, e))?;
    Ok(commit)
}

fn commit_files(source: &Path, git_dir: &Path, files: &[PathBuf], message: &str) -> Result<String, SweError> {
    git(None, &["init", "--quiet", "--bare"], Some(git_dir))?;
    let mut add = vec![
        "--work-tree".as_ref(),
        source.as_os_str(),
        "add".as_ref(),
        "--chmod=-x".as_ref(),
        "--".as_ref(),
    ];
    add.extend(files.iter().map(|f| f.as_os_str()));
    git(Some(git_dir), &add, None)?;
    let tree = git(Some(git_dir), &["write-tree"], None)?;
    let commit = git(Some(git_dir), &["commit-tree", tree.as_str(), "-m", message], None)?;
    git(Some(git_dir), &["update-ref", BRANCH, commit.as_str()], None)?;
    git(Some(git_dir), &["symbolic-ref", "HEAD", BRANCH], None)?;
    let _ = std::fs::remove_file(git_dir.join("index"));
    Ok(commit)
}

/// The commit `main` points at in the bare repository at `git_dir`, if it is one.
fn head_of(git_dir: &Path) -> Option<String> {
    git_dir
        .exists()
        .then(|| git(Some(git_dir), &["rev-parse", "--verify", "--quiet", BRANCH], None).ok())
        .flatten()
}

/// The files under `source`, relative to it, sorted.
fn source_files(source: &Path) -> Result<Vec<PathBuf>, SweError> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = source.join(&relative);
        let entries = std::fs::read_dir(&dir).map_err(|e| SweError::io("list", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| SweError::io("list", &dir, e))?;
            let name = entry.file_name();
            let skipped = SKIPPED.iter().any(|s| name == *s) || name.to_string_lossy().ends_with(".pyc");
            if skipped {
                continue;
            }
            let path = relative.join(&name);
            match entry
                .file_type()
                .map_err(|e| SweError::io("inspect", &entry.path(), e))?
            {
                t if t.is_dir() => pending.push(path),
                t if t.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(SweError::io(
            "find files in",
            source,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    Ok(files)
}

/// Writes a bundle of every ref of the repository at `repo` (bare or not) to `dest`.
pub(crate) fn bundle(repo: &Path, dest: &Path) -> Result<(), SweError> {
    git(
        None,
        &[
            "-C".as_ref(),
            repo.as_os_str(),
            "bundle".as_ref(),
            "create".as_ref(),
            dest.as_os_str(),
            "--all".as_ref(),
        ],
        None,
    )
    .map(drop)
}

/// Clones `repo` (a URL or a path) to `dest` on this machine and checks out `commit` there,
/// detached.
pub(crate) fn clone_at(repo: &str, commit: &str, dest: &Path) -> Result<(), SweError> {
    let clone: [&std::ffi::OsStr; 4] = [
        "clone".as_ref(),
        "--quiet".as_ref(),
        "--no-checkout".as_ref(),
        repo.as_ref(),
    ];
    git(None, &clone, Some(dest))?;
    let checkout: [&std::ffi::OsStr; 6] = [
        "-C".as_ref(),
        dest.as_os_str(),
        "checkout".as_ref(),
        "--quiet".as_ref(),
        "--detach".as_ref(),
        commit.as_ref(),
    ];
    git(None, &checkout, None).map(drop)
}

/// Runs host-side git, isolated from the user's and the system's git config, with the fixed
/// identity and date; returns its trimmed stdout. `target` is appended as a last argument.
fn git<S: AsRef<std::ffi::OsStr>>(
    git_dir: Option<&Path>,
    args: &[S],
    target: Option<&Path>,
) -> Result<String, SweError> {
    let mut command = Command::new("git");
    if let Some(git_dir) = git_dir {
        command.arg("--git-dir").arg(git_dir);
    }
    command.args(args);
    if let Some(target) = target {
        command.arg(target);
    }
    command
        .env(env_vars::GIT_CONFIG_GLOBAL, "/dev/null")
        .env(env_vars::GIT_CONFIG_NOSYSTEM, "1")
        .env(env_vars::GIT_AUTHOR_NAME, AUTHOR_NAME)
        .env(env_vars::GIT_AUTHOR_EMAIL, AUTHOR_EMAIL)
        .env(env_vars::GIT_AUTHOR_DATE, COMMIT_DATE)
        .env(env_vars::GIT_COMMITTER_NAME, AUTHOR_NAME)
        .env(env_vars::GIT_COMMITTER_EMAIL, AUTHOR_EMAIL)
        .env(env_vars::GIT_COMMITTER_DATE, COMMIT_DATE);
    let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    let output = command.output().map_err(|source| SweError::Git {
        args: shown.join(" "),
        output: source.to_string(),
    })?;
    if !output.status.success() {
        return Err(SweError::Git {
            args: shown.join(" "),
            output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

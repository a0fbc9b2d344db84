//! The file tools, run host-side on a slot's workspace through cap-std, so no path (`../`, an
//! absolute path, a symlink) can reach outside it.

use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

use super::tools::{EditFileArgs, ListDirArgs, ReadFileArgs, SearchArgs, ToolRequest, WriteFileArgs};
use crate::slot::LimitKind;
use crate::slot::cell::cap_text;
use crate::slot::{BackendError, ErrorKind, ExecutionResult};

/// Where the workspace appears inside a sandbox. Tool paths may be relative to it or start
/// with it.
pub const GUEST_WORKSPACE: &str = "/workspace";

/// The most entries `list_dir` returns.
const MAX_DIR_ENTRIES: usize = 1_000;
/// The most matching lines `search` returns.
const MAX_SEARCH_MATCHES: usize = 200;
/// The most files `search` reads.
const MAX_SEARCH_FILES: usize = 10_000;
/// Larger files are skipped by `search`: they are data, not source.
const MAX_SEARCH_FILE_BYTES: u64 = 2 << 20;
/// The most bytes `read_file` and `edit_file` load.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// The most bytes a compiled search pattern may take.
const MAX_REGEX_BYTES: usize = 1 << 20;

/// A file tool failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The path leaves the workspace.
    #[error("the path `{0}` is outside the workspace; use a path relative to the workspace (or under /workspace)")]
    OutsideWorkspace(String),
    /// Nothing at the path.
    #[error("no such file or directory: `{0}`")]
    NotFound(String),
    /// `edit_file`'s text is not in the file.
    #[error("`old_string` was not found in `{0}`; read the file and copy the exact text, whitespace included")]
    TextMissing(String),
    /// `edit_file`'s text is in the file more than once.
    #[error("`old_string` occurs {count} times in `{path}`; include more surrounding lines so it occurs exactly once")]
    TextNotUnique {
        /// The file.
        path: String,
        /// How often it occurs.
        count: usize,
    },
    /// The file is binary or not UTF-8.
    #[error("`{0}` is not a UTF-8 text file")]
    NotText(String),
    /// The file is larger than the tools load.
    #[error(
        "`{path}` is {size} bytes, over the {MAX_FILE_BYTES}-byte limit of the file tools; use python or bash to process it"
    )]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The path is a FIFO, a socket or a device: reading it could block forever or never end.
    #[error("`{0}` is not a regular file (a FIFO, socket or device); the file tools read regular files only")]
    NotRegular(String),
    /// The pattern is not a valid regular expression.
    #[error("invalid search pattern: {0}")]
    BadPattern(String),
    /// Another I/O failure.
    #[error("failed to {op} `{path}`")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path as given.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A slot's workspace directory, opened with capabilities confined to it.
pub struct Workspace {
    dir: Dir,
}

impl Workspace {
    /// Makes a new slot's workspace and private `/tmp` folders on this host and opens the
    /// workspace: the start of `acquire` in every backend that keeps its slots here.
    pub fn create(workspace: &Path, tmp: &Path) -> Result<Workspace, BackendError> {
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BackendError::Workspace { path, source }
        };
        for dir in [workspace, tmp] {
            std::fs::create_dir_all(dir).map_err(failed(dir))?;
        }
        Workspace::open(workspace).map_err(failed(workspace))
    }

    /// Opens the directory at `root`.
    pub fn open(root: &Path) -> std::io::Result<Workspace> {
        Ok(Workspace {
            dir: Dir::open_ambient_dir(root, ambient_authority())?,
        })
    }

    /// Runs a file tool (`read_file`, `write_file`, `edit_file`, `list_dir`, `search`) and turns
    /// its outcome into a result, text capped at `max_bytes`. Every backend's file tools are this
    /// one function, so they behave the same everywhere. `python` and `bash` are not file tools
    /// and get a [`ErrorKind::ToolUnavailable`] result.
    pub fn run_file_tool(&self, request: &ToolRequest, max_bytes: usize) -> ExecutionResult {
        let outcome: Result<(String, bool), WorkspaceError> = match request {
            ToolRequest::ReadFile(args) => self.read_file(args, max_bytes),
            ToolRequest::WriteFile(args) => self.write_file(args).map(|s| (s, false)),
            ToolRequest::EditFile(args) => self.edit_file(args).map(|s| (s, false)),
            ToolRequest::ListDir(args) => self.list_dir(args),
            ToolRequest::Search(args) => self.search(args),
            ToolRequest::Python(_) | ToolRequest::Bash(_) => {
                let message = format!("`{}` is not a file tool; the backend runs it itself", request.tool());
                return ExecutionResult::failure(ErrorKind::ToolUnavailable, message, Default::default());
            }
        };
        match outcome {
            Ok((text, truncated)) => {
                let mut result = ExecutionResult::ok(text, Default::default());
                result.metadata.truncated = truncated;
                result.metadata.limit_hit = truncated.then_some(LimitKind::Output);
                result
            }
            Err(error) => ExecutionResult::failure(ErrorKind::Workspace, error.to_string(), Default::default()),
        }
    }

    /// `read_file`: the file's text, or the lines `offset..offset+limit`, capped at `max_bytes`.
    pub fn read_file(&self, args: &ReadFileArgs, max_bytes: usize) -> Result<(String, bool), WorkspaceError> {
        let text = self.read_text(&args.path)?;
        let first = args.offset.unwrap_or(1).max(1) - 1;
        let selected = match (args.offset, args.limit) {
            (None, None) => text,
            _ => {
                let lines = text.split_inclusive('\n').skip(first);
                match args.limit {
                    Some(limit) => lines.take(limit).collect(),
                    None => lines.collect(),
                }
            }
        };
        Ok(cap_text(&selected, max_bytes))
    }

    /// `write_file`: writes `content`, creating parent directories.
    pub fn write_file(&self, args: &WriteFileArgs) -> Result<String, WorkspaceError> {
        let path = confine(&args.path)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.dir
                .create_dir_all(parent)
                .map_err(|e| io_error("create the directories for", &args.path, e))?;
        }
        self.write_regular(&path, &args.path, args.content.as_bytes())?;
        Ok(format!("wrote {} bytes to {}", args.content.len(), args.path))
    }

    /// `edit_file`: replaces the one occurrence of `old_string`.
    pub fn edit_file(&self, args: &EditFileArgs) -> Result<String, WorkspaceError> {
        if args.old_string.is_empty() {
            return Err(WorkspaceError::TextMissing(args.path.clone()));
        }
        let text = self.read_text(&args.path)?;
        match text.matches(&args.old_string).count() {
            0 => return Err(WorkspaceError::TextMissing(args.path.clone())),
            1 => {}
            count => {
                return Err(WorkspaceError::TextNotUnique {
                    path: args.path.clone(),
                    count,
                });
            }
        }
        let edited = text.replacen(&args.old_string, &args.new_string, 1);
        let path = confine(&args.path)?;
        self.write_regular(&path, &args.path, edited.as_bytes())?;
        Ok(format!("edited {}: replaced 1 occurrence", args.path))
    }

    /// `list_dir`: one entry per line, directories with a trailing `/`, sorted.
    pub fn list_dir(&self, args: &ListDirArgs) -> Result<(String, bool), WorkspaceError> {
        let path = confine(&args.path)?;
        let entries = self.dir.read_dir(&path).map_err(|e| io_error("list", &args.path, e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &args.path, e))?;
            let mut name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                name.push('/');
            }
            names.push(name);
        }
        names.sort();
        let truncated = names.len() > MAX_DIR_ENTRIES;
        let total = names.len();
        names.truncate(MAX_DIR_ENTRIES);
        let mut listing = names.join("\n");
        if truncated {
            listing.push_str(&format!(
                "\n[rollbox: {} more entries not shown]",
                total - MAX_DIR_ENTRIES
            ));
        }
        Ok((listing, truncated))
    }

    /// `search`: `path:line: text` for each matching line, at most 200 (`MAX_SEARCH_MATCHES`).
    pub fn search(&self, args: &SearchArgs) -> Result<(String, bool), WorkspaceError> {
        let pattern = regex::RegexBuilder::new(&args.pattern)
            .size_limit(MAX_REGEX_BYTES)
            .build()
            .map_err(|e| WorkspaceError::BadPattern(e.to_string()))?;
        let start = confine(&args.path)?;
        let meta = self
            .dir
            .metadata(&start)
            .map_err(|e| io_error("search", &args.path, e))?;
        let mut files = Vec::new();
        if meta.is_dir() {
            self.collect_files(start, &mut files)?;
        } else {
            files.push(start);
        }
        files.sort();
        let mut matches = Vec::new();
        let mut total = 0usize;
        for file in &files {
            // A FIFO or device named directly is refused; one met while walking is skipped.
            let bytes = match self.read_regular(file, &file.to_string_lossy()) {
                Ok(bytes) => bytes,
                Err(error @ WorkspaceError::NotRegular(_)) if files.len() == 1 => return Err(error),
                Err(_) => continue,
            };
            let Ok(text) = String::from_utf8(bytes) else { continue };
            for (number, line) in text.lines().enumerate() {
                if pattern.is_match(line) {
                    total += 1;
                    if matches.len() < MAX_SEARCH_MATCHES {
                        matches.push(format!("{}:{}: {}", file.display(), number + 1, line));
                    }
                }
            }
        }
        let truncated = total > matches.len();
        let mut report = if matches.is_empty() {
            "no matches".to_string()
        } else {
            matches.join("\n")
        };
        if truncated {
            report.push_str(&format!(
                "\n[rollbox: {} more matches not shown]",
                total - matches.len()
            ));
        }
        Ok((report, truncated))
    }

    fn collect_files(&self, dir: PathBuf, files: &mut Vec<PathBuf>) -> Result<(), WorkspaceError> {
        let mut pending = vec![dir];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = self.dir.read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if files.len() >= MAX_SEARCH_FILES {
                    return Ok(());
                }
                let name = entry.file_name();
                if name == ".git" {
                    continue;
                }
                let path = if dir == Path::new(".") {
                    PathBuf::from(&name)
                } else {
                    dir.join(&name)
                };
                match entry.file_type() {
                    Ok(t) if t.is_dir() => pending.push(path),
                    Ok(t)
                        if t.is_file()
                            && entry
                                .metadata()
                                .map(|m| m.len() <= MAX_SEARCH_FILE_BYTES)
                                .unwrap_or(false) =>
                    {
                        files.push(path);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn read_text(&self, path_as_given: &str) -> Result<String, WorkspaceError> {
        let path = confine(path_as_given)?;
        let bytes = self.read_regular(&path, path_as_given)?;
        String::from_utf8(bytes).map_err(|_| WorkspaceError::NotText(path_as_given.to_string()))
    }

    /// Writes `bytes` to the regular file at `path`, creating or truncating it. Opened without
    /// blocking, as [`Self::read_regular`] is: a FIFO with no reader fails at once instead of
    /// waiting, and anything but a regular file is refused before a byte is written.
    fn write_regular(&self, path: &Path, path_as_given: &str, bytes: &[u8]) -> Result<(), WorkspaceError> {
        use std::io::Write;

        use cap_std::fs::OpenOptionsExt;

        let mut options = cap_std::fs::OpenOptions::new();
        options.write(true).create(true).custom_flags(libc::O_NONBLOCK);
        let mut file = self
            .dir
            .open_with(path, &options)
            .map_err(|e| io_error("write", path_as_given, e))?;
        let meta = file.metadata().map_err(|e| io_error("write", path_as_given, e))?;
        if !meta.is_file() {
            return Err(WorkspaceError::NotRegular(path_as_given.to_string()));
        }
        file.set_len(0).map_err(|e| io_error("write", path_as_given, e))?;
        file.write_all(bytes).map_err(|e| io_error("write", path_as_given, e))
    }

    /// The bytes of the regular file at `path`, at most [`MAX_FILE_BYTES`]. The file is opened
    /// without blocking and checked on the open descriptor, so a FIFO (whose open or read
    /// would wait for a writer forever) or a device is refused, even one swapped in after a
    /// check by path; the read stops past the limit, even for a file that grows meanwhile.
    fn read_regular(&self, path: &Path, path_as_given: &str) -> Result<Vec<u8>, WorkspaceError> {
        use std::io::Read;

        use cap_std::fs::OpenOptionsExt;

        let file = self
            .dir
            .open_with(
                path,
                cap_std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK),
            )
            .map_err(|e| io_error("read", path_as_given, e))?;
        let meta = file.metadata().map_err(|e| io_error("read", path_as_given, e))?;
        if !meta.is_file() {
            return Err(WorkspaceError::NotRegular(path_as_given.to_string()));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(WorkspaceError::TooLarge {
                path: path_as_given.to_string(),
                size: meta.len(),
            });
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error("read", path_as_given, e))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(WorkspaceError::TooLarge {
                path: path_as_given.to_string(),
                size: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }
}

/// The workspace-relative form of `path`: relative paths as they are, `/workspace/...` without
/// its prefix; any other absolute path, or one whose `..` climbs above the workspace, is refused.
pub fn confine(path: &str) -> Result<PathBuf, WorkspaceError> {
    let outside = || WorkspaceError::OutsideWorkspace(path.to_string());
    let relative = match Path::new(path).strip_prefix(GUEST_WORKSPACE) {
        Ok(rest) => rest,
        Err(_) if Path::new(path).is_absolute() => return Err(outside()),
        Err(_) => Path::new(path),
    };
    let mut confined = PathBuf::new();
    for component in relative.components() {
        match component {
            Component::Normal(part) => confined.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !confined.pop() {
                    return Err(outside());
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
        }
    }
    if confined.as_os_str().is_empty() {
        confined.push(".");
    }
    Ok(confined)
}

fn io_error(op: &'static str, path: &str, source: std::io::Error) -> WorkspaceError {
    match source.kind() {
        std::io::ErrorKind::NotFound => WorkspaceError::NotFound(path.to_string()),
        // cap-std answers PermissionDenied for a symlink that points outside the workspace.
        std::io::ErrorKind::PermissionDenied if source.to_string().contains("outside") => {
            WorkspaceError::OutsideWorkspace(path.to_string())
        }
        _ => WorkspaceError::Io {
            op,
            path: path.to_string(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confine_keeps_relative_paths_and_refuses_escapes() {
        assert_eq!(confine("a/b.txt").unwrap(), PathBuf::from("a/b.txt"));
        assert_eq!(confine("/workspace/a/../b").unwrap(), PathBuf::from("b"));
        assert_eq!(confine("/workspace").unwrap(), PathBuf::from("."));
        assert!(matches!(
            confine("../etc/passwd"),
            Err(WorkspaceError::OutsideWorkspace(_))
        ));
        assert!(matches!(
            confine("/etc/passwd"),
            Err(WorkspaceError::OutsideWorkspace(_))
        ));
        assert!(matches!(confine("a/../../x"), Err(WorkspaceError::OutsideWorkspace(_))));
    }
}

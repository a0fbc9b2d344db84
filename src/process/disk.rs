//! A cap on what a process slot's folders hold in all: bytes ([`Limits::disk_bytes`]) and files
//! ([`Limits::disk_files`]).
//!
//! 32 × 64 MiB writes filled 2 GiB of the host's disk in 2.7 s; `RLIMIT_FSIZE` caps each file,
//! not their sum. The slot's root (its workspace and `/tmp`) is therefore its own tmpfs,
//! mounted by the host with `size=` and `nr_inodes=`: the kernel refuses every write and
//! creation past them with `ENOSPC`, from `dd`, `fallocate` or anything else, in every program
//! of the slot, and the host's file tools too; a sparse file takes only the pages written. It is
//! one mount, made once per slot, that every sandbox of the slot binds, so it holds between
//! calls.
//!
//! Why a tmpfs rather than a check on the host's side: a check that measures between writes
//! comes too late for `dd` at disk speed or one `fallocate`, and a disk quota needs the host's
//! file system to have project quotas. The cost is that a slot's files live in memory (and swap):
//! docs/security.md and docs/process-backend.md say so. A slot released without resetting its
//! workspace has the workspace copied to the host's disk first, where the caller finds it.
//!
//! Mounting needs root (`CAP_SYS_ADMIN`); without it, slots run with no disk cap, and the
//! backend warns when it starts and at each slot.
//!
//! [`Limits::disk_bytes`]: crate::Limits::disk_bytes
//! [`Limits::disk_files`]: crate::Limits::disk_files

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::slot::{LimitKind, Limits};

/// Inodes the slot's tmpfs spends on its own folders (the root, `workspace/`, `tmp/`), on top
/// of the files the slot may make.
const OWN_FOLDERS: u64 = 3;

/// The source of every slot's tmpfs in the mount table, followed by the owner's process id.
const MOUNT_SOURCE: &str = "rollbox-slot-";

/// Unmounts the slot tmpfs that rollbox processes which are gone left behind (killed with
/// `SIGKILL`, they ran no clean-up), so their files stop holding memory. Returns how many.
pub(crate) fn unmount_orphans() -> usize {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    let mut unmounted = 0;
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let mut after = after.split_whitespace();
        let (Some("tmpfs"), Some(source)) = (after.next(), after.next()) else {
            continue;
        };
        let Some(owner) = source
            .strip_prefix(MOUNT_SOURCE)
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(mount_point) = before.split_whitespace().nth(4) else {
            continue;
        };
        if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        // mountinfo escapes spaces and the like as octal; such a path is left alone.
        if mount_point.contains('\\') {
            continue;
        }
        let Ok(path) = c_path(Path::new(mount_point)) else {
            continue;
        };
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
            unmounted += 1;
        }
    }
    unmounted
}

/// One slot's tmpfs. Dropping it unmounts it, and what it held is gone.
#[derive(Debug)]
pub(crate) struct SlotDisk {
    root: PathBuf,
    mounted: AtomicBool,
}

impl SlotDisk {
    /// Mounts a tmpfs of `limits.disk_bytes` and `limits.disk_files` at `root` (made if
    /// missing).
    pub(crate) fn mount(root: &Path, limits: &Limits) -> std::io::Result<SlotDisk> {
        std::fs::create_dir_all(root)?;
        let target = c_path(root)?;
        let options = CString::new(format!(
            "size={},nr_inodes={},mode=0755",
            limits.disk_bytes.max(1),
            limits.disk_files.saturating_add(OWN_FOLDERS)
        ))
        .map_err(std::io::Error::other)?;
        // The source names the owner, so a later backend can unmount what a killed one left.
        let source = CString::new(format!("{MOUNT_SOURCE}{}", std::process::id())).map_err(std::io::Error::other)?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let status = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        };
        if status != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SlotDisk {
            root: root.to_path_buf(),
            mounted: AtomicBool::new(true),
        })
    }

    /// Which cap the slot's folders are at now, if any: no byte or no file left for anyone.
    pub(crate) fn full(&self) -> Option<LimitKind> {
        let path = c_path(&self.root).ok()?;
        // SAFETY: `stats` is a local the kernel fills in; `path` is NUL-terminated.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
            return None;
        }
        if stats.f_ffree == 0 {
            Some(LimitKind::Files)
        } else if stats.f_bavail == 0 {
            Some(LimitKind::Disk)
        } else {
            None
        }
    }

    /// Copies `workspace` (inside this tmpfs) to the host's disk, unmounts, and puts the copy
    /// where the workspace was: a slot released without a reset keeps its workspace. The
    /// slot's `/tmp` goes with the tmpfs.
    pub(crate) fn keep_workspace(&self, workspace: &Path) -> std::io::Result<()> {
        let name = self
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = self.root.parent().unwrap_or(Path::new("/"));
        let kept = parent.join(format!(".{name}-kept-workspace"));
        let _ = std::fs::remove_dir_all(&kept);
        copy_tree(workspace, &kept)?;
        self.unmount();
        std::fs::rename(&kept, workspace)
    }

    /// Unmounts the tmpfs (lazily, should a process still hold it); idempotent.
    pub(crate) fn unmount(&self) {
        if !self.mounted.swap(false, Ordering::Relaxed) {
            return;
        }
        let Ok(path) = c_path(&self.root) else { return };
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(root = %self.root.display(), %error, "failed to unmount a slot's tmpfs");
        }
    }
}

impl Drop for SlotDisk {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// The message a call that left the slot at `limit` carries, naming the cap and its flag.
pub(crate) fn full_message(limit: LimitKind, limits: &Limits) -> String {
    match limit {
        LimitKind::Files => format!(
            "the slot's folders are at their limit of {} files (--max-disk-files); creating more fails with ENOSPC",
            limits.disk_files
        ),
        _ => format!(
            "the slot's folders are at their limit of {} bytes (--max-disk-bytes); writing more fails with ENOSPC",
            limits.disk_bytes
        ),
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("a path holds a NUL byte"))
}

/// Copies the folder `from` to `to` (which must not exist): folders, files with their
/// permissions, and symbolic links as links.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
        } else if kind.is_dir() {
            copy_tree(&source, &target)?;
        } else if kind.is_file() {
            std::fs::copy(&source, &target)?;
        }
    }
    Ok(())
}

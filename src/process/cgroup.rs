//! A per-slot cap on processes ([`Limits::processes`]): every program of a slot runs in the
//! slot's own `pids` cgroup, whose `pids.max` the kernel enforces on every fork and thread.
//!
//! rollbox runs as root on its hosts, where `RLIMIT_NPROC` does not bind, and a process that
//! calls `setsid` leaves the process group a timeout kills: a fork bomb started through
//! `subprocess.Popen` reached 1,100 processes in 4 s, and a detached one ran until release. A
//! cgroup fixes both: the cap holds whatever the processes do, and a cgroup's members can be
//! listed and killed however they detached.
//!
//! The layout, under the `pids` hierarchy (cgroup v1) or the unified one (v2), beside the
//! backend's own cgroup: `rollbox-PID-N/` for the backend, `slot-ID/` for each slot (with
//! `pids.max`), and `p-N/` for each program (a `bash` command, or the slot's interpreter) in
//! it. A program's group is killed when the program ends (a command) or is lost (the
//! interpreter, at a timeout or crash); the slot's at release. Killing sends `SIGKILL` to every
//! member until none is left (`cgroup.kill` on v2), then removes the folder.
//!
//! Without a usable controller (no `pids` hierarchy, no permission), slots run uncapped: the
//! backend warns when it starts and at each slot, and docs/security.md says what that leaves
//! open.
//!
//! [`Limits::processes`]: crate::Limits::processes

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long killing a group may keep finding new members before it gives up (with a warning).
/// Under `pids.max` a fork bomb cannot outgrow the kills: each pass kills all it finds.
const KILL_PATIENCE: Duration = Duration::from_secs(5);
/// The pause between two passes of the kill loop, so the kernel can finish the exits.
const KILL_PASS_PAUSE: Duration = Duration::from_millis(1);

/// Which cgroup interface the `pids` controller is reached through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    /// A `cgroup` mount with the `pids` option.
    V1,
    /// The unified `cgroup2` mount, `pids` among its controllers.
    V2,
}

/// Why slots cannot get a process cap on this host.
#[derive(Debug, thiserror::Error)]
pub enum CgroupUnavailable {
    /// Neither a v1 `pids` hierarchy nor a v2 mount with the `pids` controller is mounted.
    #[error("no cgroup hierarchy with the `pids` controller is mounted (looked in /proc/self/mountinfo)")]
    NoController,
    /// This process's own cgroup could not be read.
    #[error("failed to read this process's cgroup from /proc/self/cgroup")]
    OwnCgroup(#[source] std::io::Error),
    /// The backend's folder could not be made or set up (no permission, a read-only mount).
    #[error("failed to set up the cgroup {path}")]
    Setup {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The backend's cgroup: the parent of every slot's.
#[derive(Debug)]
pub(crate) struct BackendCgroup {
    dir: PathBuf,
    version: Version,
    max_processes: u32,
    next_program: AtomicU64,
}

impl BackendCgroup {
    /// Makes the backend's cgroup beside this process's own, in the first `pids` hierarchy found.
    pub(crate) fn create(max_processes: u32) -> Result<Arc<BackendCgroup>, CgroupUnavailable> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupUnavailable::OwnCgroup)?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(CgroupUnavailable::OwnCgroup)?;
        let (mount, version) = pids_mount(&mountinfo).ok_or(CgroupUnavailable::NoController)?;
        let own_path = own_cgroup(&own, version).ok_or(CgroupUnavailable::NoController)?;
        let parent = mount.join(own_path.trim_start_matches('/'));
        if version == Version::V2 {
            enable_pids(&parent)?;
        }
        remove_orphans(&parent);
        static BACKENDS: AtomicU64 = AtomicU64::new(0);
        let dir = parent.join(format!(
            "rollbox-{}-{}",
            std::process::id(),
            BACKENDS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|source| CgroupUnavailable::Setup {
            path: dir.clone(),
            source,
        })?;
        let backend = BackendCgroup {
            dir,
            version,
            max_processes,
            next_program: AtomicU64::new(0),
        };
        if version == Version::V2 {
            enable_pids(&backend.dir)?;
        }
        Ok(Arc::new(backend))
    }

    /// A slot's cgroup, capped at the backend's process limit.
    pub(crate) fn slot(self: &Arc<Self>, name: &str) -> Result<SlotCgroup, CgroupUnavailable> {
        let dir = self.dir.join(format!("slot-{name}"));
        let setup = |path: PathBuf, source| CgroupUnavailable::Setup { path, source };
        std::fs::create_dir(&dir).map_err(|e| setup(dir.clone(), e))?;
        let slot = SlotCgroup {
            dir,
            backend: self.clone(),
            retired_refusals: Arc::new(AtomicU64::new(0)),
        };
        let max = slot.dir.join("pids.max");
        std::fs::write(&max, self.max_processes.to_string()).map_err(|e| setup(max, e))?;
        Ok(slot)
    }

    /// The most processes each slot may run.
    pub(crate) fn max_processes(&self) -> u32 {
        self.max_processes
    }
}

impl Drop for BackendCgroup {
    fn drop(&mut self) {
        // Every slot's group is gone by now (each holds this one alive); the folder is empty.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One slot's cgroup. Dropping it kills everything in it and removes it.
#[derive(Debug)]
pub(crate) struct SlotCgroup {
    dir: PathBuf,
    backend: Arc<BackendCgroup>,
    /// Forks refused in program groups that are gone (see [`SlotCgroup::forks_refused`]).
    retired_refusals: Arc<AtomicU64>,
}

impl SlotCgroup {
    /// A new group for one program of the slot; the program joins it with
    /// [`ProgramCgroup::join_in_child`] before it runs.
    pub(crate) fn program(&self) -> std::io::Result<ProgramCgroup> {
        let n = self.backend.next_program.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("p-{n}"));
        std::fs::create_dir(&dir)?;
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("a cgroup path holds a NUL byte"))?;
        Ok(ProgramCgroup {
            dir,
            procs,
            version: self.backend.version,
            retired_refusals: self.retired_refusals.clone(),
        })
    }

    /// A count that grows whenever the cap refuses one of the slot's forks (`pids.events`).
    /// cgroup v1 counts a refusal in the group that forked (a program's), v2 in the one whose
    /// limit was reached (the slot's): the sum over both, and over the program groups already
    /// gone, grows either way. Only its growth means anything.
    pub(crate) fn forks_refused(&self) -> u64 {
        let programs: u64 = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|entry| refusals(&entry.path()))
                    .sum()
            })
            .unwrap_or(0);
        refusals(&self.dir) + programs + self.retired_refusals.load(Ordering::Relaxed)
    }

    /// How many processes and threads run in the slot now (`pids.current`).
    pub fn current(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("pids.current"))
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Kills every process of the slot, in every program's group; the groups stay until dropped.
    pub(crate) fn kill_all(&self) {
        kill_tree(&self.dir, self.backend.version, false);
    }

    /// The slot's cap.
    pub(crate) fn max_processes(&self) -> u32 {
        self.backend.max_processes()
    }

    /// The slot's cgroup folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SlotCgroup {
    fn drop(&mut self) {
        kill_tree(&self.dir, self.backend.version, true);
    }
}

/// One program's cgroup inside its slot's. Dropping it kills everything in it and removes it.
#[derive(Debug)]
pub(crate) struct ProgramCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, ready for the child to open between fork and exec without allocating.
    procs: CString,
    version: Version,
    /// Where this group's refused forks are added when it goes.
    retired_refusals: Arc<AtomicU64>,
}

impl ProgramCgroup {
    /// Moves the calling process into this group. Runs between fork and exec: it only opens,
    /// writes and closes (async-signal-safe), and writes `0`, which the kernel reads as "the
    /// writer".
    pub(crate) fn join_in_child(procs: &CString) -> std::io::Result<()> {
        // SAFETY: plain syscalls on a NUL-terminated path and a one-byte local buffer.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
        }
        Ok(())
    }

    /// The group's `cgroup.procs`, for [`ProgramCgroup::join_in_child`].
    pub(crate) fn procs_path(&self) -> CString {
        self.procs.clone()
    }

    /// Kills every process in the group, now; the group stays until dropped.
    pub(crate) fn kill_all(&self) {
        kill_members(&self.dir, self.version);
    }
}

impl Drop for ProgramCgroup {
    fn drop(&mut self) {
        self.retired_refusals.fetch_add(refusals(&self.dir), Ordering::Relaxed);
        kill_tree(&self.dir, self.version, true);
    }
}

/// The `max` count of `dir`'s `pids.events`: forks refused there.
fn refusals(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("pids.events"))
        .ok()
        .and_then(|events| {
            events
                .lines()
                .find_map(|line| line.strip_prefix("max ").and_then(|n| n.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// Kills every process in `dir` and the groups under it, and with `remove` removes them,
/// deepest first.
fn kill_tree(dir: &Path, version: Version, remove: bool) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                kill_tree(&entry.path(), version, remove);
            }
        }
    }
    kill_members(dir, version);
    if !remove {
        return;
    }
    if let Err(error) = std::fs::remove_dir(dir)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(cgroup = %dir.display(), %error, "failed to remove a slot's cgroup; a process may still run in it");
    }
}

/// Sends `SIGKILL` to every member of `dir` until it has none (v1 and v2 list only a group's
/// own members in `cgroup.procs`). On v2, `cgroup.kill` does it in one write.
fn kill_members(dir: &Path, version: Version) {
    if version == Version::V2 {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    }
    let procs = dir.join("cgroup.procs");
    let give_up = Instant::now() + KILL_PATIENCE;
    loop {
        let Ok(members) = std::fs::read_to_string(&procs) else {
            return;
        };
        let pids: Vec<libc::pid_t> = members.lines().filter_map(|line| line.trim().parse().ok()).collect();
        if pids.is_empty() {
            return;
        }
        if Instant::now() > give_up {
            tracing::warn!(cgroup = %dir.display(), left = pids.len(), "processes kept appearing in a slot's cgroup; giving up killing them");
            return;
        }
        for pid in pids {
            // SAFETY: a plain syscall. The pid was in the group a moment ago. A member that
            // exited since frees its id, but the kernel hands ids out in order up to
            // `pid_max` before reusing one, so no other process gets it in this instant.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(KILL_PASS_PAUSE);
    }
}

/// Kills what is left in, and removes, the backend cgroups under `parent` whose rollbox is gone
/// (`rollbox-PID-N` with no process PID): a rollbox killed with `SIGKILL` runs no clean-up.
fn remove_orphans(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix("rollbox-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner != std::process::id() && !Path::new(&format!("/proc/{owner}")).exists() {
            let version = if entry.path().join("cgroup.kill").exists() || parent.join("cgroup.controllers").exists() {
                Version::V2
            } else {
                Version::V1
            };
            kill_tree(&entry.path(), version, true);
        }
    }
}

/// Writes `+pids` to `dir`'s `cgroup.subtree_control` (v2), so its children get `pids.max`.
fn enable_pids(dir: &Path) -> Result<(), CgroupUnavailable> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).is_ok_and(|c| c.split_whitespace().any(|w| w == "pids"));
    if enabled {
        return Ok(());
    }
    std::fs::write(&control, "+pids").map_err(|source| CgroupUnavailable::Setup { path: control, source })
}

/// The mount point of the `pids` controller: a v1 hierarchy that has it, else the v2 mount if
/// its root offers it.
fn pids_mount(mountinfo: &str) -> Option<(PathBuf, Version)> {
    let mut v2 = None;
    for line in mountinfo.lines() {
        // mountinfo: ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = before.split_whitespace().nth(4) else {
            continue;
        };
        let mut after = after.split_whitespace();
        let (Some(fstype), Some(_source), Some(options)) = (after.next(), after.next(), after.next()) else {
            continue;
        };
        let mount_point = PathBuf::from(mount_point);
        match fstype {
            "cgroup" if options.split(',').any(|o| o == "pids") => return Some((mount_point, Version::V1)),
            "cgroup2" if v2.is_none() => {
                let controllers = std::fs::read_to_string(mount_point.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "pids") {
                    v2 = Some(mount_point);
                }
            }
            _ => {}
        }
    }
    v2.map(|mount| (mount, Version::V2))
}

/// This process's cgroup path in the hierarchy of `version`, from `/proc/self/cgroup`.
fn own_cgroup(proc_cgroup: &str, version: Version) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = match version {
            Version::V1 => controllers.split(',').any(|c| c == "pids"),
            Version::V2 => controllers.is_empty(),
        };
        ours.then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pids_hierarchy_and_own_path_are_read_from_proc() {
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                         35 25 0:31 / /sys/fs/cgroup/pids rw,relatime shared:9 - cgroup cgroup rw,pids\n";
        assert_eq!(
            pids_mount(mountinfo),
            Some((PathBuf::from("/sys/fs/cgroup/pids"), Version::V1))
        );
        let own = "9:name=systemd:/\n8:pids:/user.slice\n4:memory:/x\n0::/other\n";
        assert_eq!(own_cgroup(own, Version::V1).as_deref(), Some("/user.slice"));
        assert_eq!(own_cgroup(own, Version::V2).as_deref(), Some("/other"));
    }
}

//! How a `process` slot's programs are started: inside bubblewrap when it is there, with a clean
//! environment, an address-space limit, and their own process group, so a timeout can end a
//! command and everything it started.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use super::cgroup::{ProgramCgroup, SlotCgroup};
use super::disk::SlotDisk;
use crate::env_vars;

/// The `PATH` every sandboxed program gets, whatever the host's is.
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The locale every sandboxed program gets: UTF-8 without depending on installed locales.
const SANDBOX_LANG: &str = "C.UTF-8";
/// Where the slot's private temporary folder appears inside bubblewrap (also `HOME`).
const SANDBOX_TMP: &str = "/tmp";
/// The name, under a slot's root (next to `workspace/`, outside it), where the SWE hooks link
/// the task's ready environment: its `bin/` is first on the slot's `PATH`, and while nothing is
/// linked that entry finds nothing and the sandbox's `PATH` applies as before.
pub const SLOT_ENV_LINK: &str = "env";

/// Whether and how a slot's programs are confined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// Inside bubblewrap at this path: no network, the host read-only, only the slot's folders
    /// and the shared cache writable.
    Bubblewrap(PathBuf),
    /// Directly on the host, as the backend's user. Only with `unsafe_no_isolation`.
    None,
}

/// The folders of one slot, all under its own root.
#[derive(Clone, Debug)]
pub(crate) struct SlotDirs {
    /// The slot's root: holds `workspace/` and `tmp/`, and is bound read-write into the sandbox.
    pub(crate) root: PathBuf,
    /// The working directory of every command and of the interpreter.
    pub(crate) workspace: PathBuf,
    /// The slot's private temporary folder, `/tmp` and `HOME` inside the sandbox.
    pub(crate) tmp: PathBuf,
    /// The slot's process cap, when this host has a `pids` cgroup controller.
    pub(crate) cgroup: Option<Arc<SlotCgroup>>,
    /// The slot's own tmpfs at `root`, its disk cap, when the host could mount one.
    pub(crate) disk: Option<Arc<SlotDisk>>,
}

impl SlotDirs {
    /// The folders of the slot rooted at `root`.
    pub(crate) fn under(root: PathBuf) -> SlotDirs {
        SlotDirs {
            workspace: root.join("workspace"),
            tmp: root.join("tmp"),
            root,
            cgroup: None,
            disk: None,
        }
    }
}

/// Starts a slot's programs; shared by every slot of a backend.
pub(crate) struct Sandbox {
    isolation: Isolation,
    limits: ChildLimits,
    /// The folder every slot root lives in; hidden inside the sandbox but for the slot's own.
    slots_root: PathBuf,
    /// The shared cache, bound read-write into every slot at its real path.
    shared_cache: PathBuf,
    spawner: Spawner,
}

impl Sandbox {
    /// A sandbox for the slots under `slots_root`.
    pub(crate) fn new(
        isolation: Isolation,
        limits: ChildLimits,
        slots_root: PathBuf,
        shared_cache: PathBuf,
    ) -> std::io::Result<Sandbox> {
        Ok(Sandbox {
            isolation,
            limits,
            slots_root,
            shared_cache,
            spawner: Spawner::start()?,
        })
    }

    /// How programs are confined.
    pub(crate) fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// `program args...` to run in `dirs.workspace`, confined, with a clean environment, its
    /// own process group, the memory limit, stdin from /dev/null and stdout/stderr piped.
    pub(crate) fn command(&self, dirs: &SlotDirs, program: &str, args: &[&OsStr]) -> std::io::Result<SandboxCommand> {
        let (mut command, setup_witness) = match &self.isolation {
            Isolation::Bubblewrap(bwrap) => {
                let witness = SetupWitness::new()?;
                let mut command = Command::new(bwrap);
                command
                    .args(self.bwrap_args(dirs))
                    .arg("--block-fd")
                    .arg(witness.read_end.as_raw_fd().to_string())
                    .arg("--")
                    .arg(program)
                    .args(args);
                let inherited = witness.read_end.as_raw_fd();
                // SAFETY: one fcntl on a descriptor the parent keeps open across the spawn.
                unsafe {
                    command.pre_exec(move || inherit_descriptor(inherited));
                }
                (command, Some(witness))
            }
            Isolation::None => {
                let mut command = Command::new(program);
                command.args(args);
                (command, None)
            }
        };
        // Inside bubblewrap the slot's tmp is /tmp; on the host it is its real path.
        let home: &Path = match self.isolation {
            Isolation::Bubblewrap(_) => Path::new(SANDBOX_TMP),
            Isolation::None => &dirs.tmp,
        };
        let slot_env = dirs.root.join(SLOT_ENV_LINK);
        let path = format!("{}:{SANDBOX_PATH}", slot_env.join("bin").display());
        command
            .env_clear()
            .env(env_vars::PATH, path)
            .env(env_vars::SLOT_ENV, slot_env)
            .env(env_vars::HOME, home)
            .env(env_vars::TMPDIR, home)
            .env(env_vars::LANG, SANDBOX_LANG)
            .env(env_vars::SHARED_CACHE, &self.shared_cache)
            .current_dir(&dirs.workspace)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let limits = self.limits;
        // SAFETY: the closure runs between fork and exec and only makes four syscalls, all
        // async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(move || limit_child(limits));
        }
        Ok(SandboxCommand { command, setup_witness })
    }

    /// Bubblewrap's options: the host read-only, a private /dev, /proc, /run and /tmp, no namespace
    /// shared with the host (so no network), the other slots hidden, and this slot's folders and
    /// the shared cache writable at their real paths.
    fn bwrap_args(&self, dirs: &SlotDirs) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&OsStr]| args.extend(parts.iter().map(|p| p.to_os_string()));
        push(&["--ro-bind".as_ref(), "/".as_ref(), "/".as_ref()]);
        // Every tmpfs a program can write is memory: each gets a size, and bubblewrap's own /dev
        // is made read-only (but for /dev/shm), so no write outside the slot's folders is
        // unbounded.
        let scratch = SCRATCH_TMPFS_BYTES.to_string();
        push(&["--dev".as_ref(), "/dev".as_ref(), "--proc".as_ref(), "/proc".as_ref()]);
        push(&[
            "--size".as_ref(),
            scratch.as_ref(),
            "--tmpfs".as_ref(),
            "/dev/shm".as_ref(),
        ]);
        push(&["--remount-ro".as_ref(), "/dev".as_ref()]);
        // A read-only mount does not stop connect() on a Unix socket, and /run holds the host's
        // daemons' sockets (docker, dbus): hide it.
        push(&["--size".as_ref(), scratch.as_ref(), "--tmpfs".as_ref(), "/run".as_ref()]);
        // /tmp first: the folders below may live under it, and their mount points are then made
        // inside the slot's own tmp.
        push(&["--bind".as_ref(), dirs.tmp.as_os_str(), SANDBOX_TMP.as_ref()]);
        push(&[
            "--size".as_ref(),
            scratch.as_ref(),
            "--tmpfs".as_ref(),
            self.slots_root.as_os_str(),
        ]);
        push(&["--bind".as_ref(), dirs.root.as_os_str(), dirs.root.as_os_str()]);
        push(&[
            "--bind".as_ref(),
            self.shared_cache.as_os_str(),
            self.shared_cache.as_os_str(),
        ]);
        push(&["--chdir".as_ref(), dirs.workspace.as_os_str()]);
        push(&[
            "--unshare-all".as_ref(),
            "--die-with-parent".as_ref(),
            "--new-session".as_ref(),
        ]);
        args
    }

    /// Starts `command` from the backend's spawner thread (see [`Spawner`]), in a new cgroup of
    /// its own inside the slot's (when the slot has one), so that everything it starts can be
    /// killed with it, however it detached.
    pub(crate) fn spawn(&self, command: SandboxCommand, dirs: &SlotDirs) -> std::io::Result<GroupLeader> {
        let SandboxCommand {
            mut command,
            setup_witness,
        } = command;
        let cgroup = dirs.cgroup.as_ref().map(|slot| slot.program()).transpose()?;
        if let Some(cgroup) = &cgroup {
            let procs = cgroup.procs_path();
            // SAFETY: the closure only opens, writes and closes a prepared path (see
            // `join_in_child`); it allocates nothing and takes no lock.
            unsafe {
                command.pre_exec(move || ProgramCgroup::join_in_child(&procs));
            }
        }
        Ok(GroupLeader {
            child: self.spawner.spawn(command)?,
            reaped: None,
            cgroup,
            setup_witness,
        })
    }
}

/// The size of each scratch tmpfs inside a sandbox (`/dev/shm`, `/run`, and the one that hides
/// other slots): what a program may write outside its slot's folders, in memory, while it runs.
const SCRATCH_TMPFS_BYTES: u64 = 64 << 20;

/// Descriptors a slot's program may hold beyond [`crate::Limits::open_files`]: those it starts
/// with (stdio, the driver's pipes, bubblewrap's own), so the cap counts what the cell opens.
const STARTING_DESCRIPTORS: u64 = 16;

/// The kernel limits every program of a slot runs under.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChildLimits {
    /// The address-space limit (`RLIMIT_AS`).
    pub(crate) memory_bytes: u64,
    /// Files the cell may open (`RLIMIT_NOFILE`, plus [`STARTING_DESCRIPTORS`]).
    pub(crate) open_files: u32,
    /// The longest file a program may write (`RLIMIT_FSIZE`).
    pub(crate) file_bytes: u64,
}

/// Applied in the child before exec: the address-space, open-file and file-size limits, and death with
/// the spawner so a crashed rollbox leaves no interpreter behind.
fn limit_child(limits: ChildLimits) -> std::io::Result<()> {
    let rlimit = |value: u64| libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    let memory = rlimit(limits.memory_bytes);
    let files = rlimit(u64::from(limits.open_files) + STARTING_DESCRIPTORS);
    let file_size = rlimit(limits.file_bytes);
    // SAFETY: setrlimit and prctl take plain values and a pointer to a local.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_AS, &memory) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::setrlimit(libc::RLIMIT_NOFILE, &files) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::setrlimit(libc::RLIMIT_FSIZE, &file_size) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A started program, leader of its own process group.
pub(crate) struct GroupLeader {
    child: Child,
    /// Set once the leader is reaped; its id may then belong to another process, so the group
    /// is never signalled again.
    reaped: Option<Option<ExitStatus>>,
    /// The program's cgroup: whatever it started, detached or not. Removed when dropped.
    cgroup: Option<ProgramCgroup>,
    /// Whether bubblewrap got as far as the program, when the program runs in bubblewrap.
    setup_witness: Option<SetupWitness>,
}

impl GroupLeader {
    /// The leader's process id.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its stdin, stdout and stderr pipes, once.
    pub(crate) fn take_pipes(&mut self) -> (Option<ChildStdin>, Option<ChildStdout>, Option<ChildStderr>) {
        (
            self.child.stdin.take(),
            self.child.stdout.take(),
            self.child.stderr.take(),
        )
    }

    /// Whether bubblewrap, now that it has ended, died before it had set the sandbox up: the
    /// program never started, and starting it again is safe. Always false without bubblewrap.
    pub(crate) fn sandbox_setup_failed(&self) -> bool {
        self.setup_witness.as_ref().is_some_and(SetupWitness::unread)
    }

    /// Sends `signal` to the program itself (not its group, nor bubblewrap around it); false
    /// when it cannot be found or signalled (it has ended).
    pub(crate) fn signal_program(&self, signal: libc::c_int) -> bool {
        if self.reaped.is_some() {
            return false;
        }
        let pid = match self.setup_witness {
            Some(_) => sandboxed_program(self.child.id()),
            None => Some(self.child.id()),
        };
        let Some(pid) = pid.and_then(|pid| libc::pid_t::try_from(pid).ok()) else {
            return false;
        };
        // SAFETY: a plain syscall; the program is a descendant of the unreaped leader.
        unsafe { libc::kill(pid, signal) == 0 }
    }

    /// Kills every process in the group and in the program's cgroup (those that left the group
    /// too), then reaps the leader and returns how it ended.
    /// Idempotent: after the first call the group is left alone.
    pub(crate) fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.reaped {
            return status;
        }
        if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: a plain syscall; the group is ours because its leader is still unreaped.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
        }
        let status = self.child.wait().ok();
        self.reaped = Some(status);
        status
    }
}

impl Drop for GroupLeader {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// The host's id of the program bubblewrap (process `leader`) runs: bubblewrap's init, its child,
/// starts the program as process 2 of the sandbox's PID namespace.
fn sandboxed_program(leader: u32) -> Option<u32> {
    let children = |pid: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .map(|list| list.split_whitespace().filter_map(|id| id.parse().ok()).collect())
            .unwrap_or_default()
    };
    let innermost_id = |pid: u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ids = status.lines().find_map(|line| line.strip_prefix("NSpid:"))?;
        ids.split_whitespace().last()?.parse().ok()
    };
    children(leader)
        .into_iter()
        .flat_map(children)
        .find(|&pid| innermost_id(pid) == Some(2))
}

/// A program for [`Sandbox::spawn`], made by [`Sandbox::command`].
pub(crate) struct SandboxCommand {
    /// The command itself, for the caller to add to (its stdin, its environment).
    pub(crate) command: Command,
    setup_witness: Option<SetupWitness>,
}

/// How often a program is started when bubblewrap fails to set its sandbox up.
///
/// Bubblewrap binds the host's root with all its mounts, then remounts each one read-only. A
/// mount that goes away in between (another slot's folder is unmounted and removed, by this
/// rollbox or another process on the host) makes it die with `Can't bind mount /oldroot/ on
/// /newroot/: Unable to apply mount flags: remount ...` (bubblewrap issue 650). Nothing of the
/// program ran then, so it is started again.
const SANDBOX_SETUP_ATTEMPTS: u32 = 8;

/// The pause before another attempt, times the attempts so far.
const SANDBOX_SETUP_PAUSE: Duration = Duration::from_millis(5);

/// What one start of a sandboxed program came to.
pub(crate) enum Attempt<T> {
    /// It ran (or failed for a reason of its own).
    Ran(T),
    /// Bubblewrap died before the program started; `T` says what that looked like.
    SetupFailed(T),
}

/// Runs `start` until bubblewrap sets the sandbox up, at most [`SANDBOX_SETUP_ATTEMPTS`]
/// times, and returns what the last attempt gave. `what` names the program in the logs.
pub(crate) fn retry_sandbox_setup<T>(what: &str, mut start: impl FnMut() -> Attempt<T>) -> T {
    let mut attempt = 1;
    loop {
        match start() {
            Attempt::Ran(outcome) => return outcome,
            Attempt::SetupFailed(outcome) if attempt >= SANDBOX_SETUP_ATTEMPTS => {
                tracing::warn!(
                    what,
                    attempts = attempt,
                    "bubblewrap failed to set the sandbox up every time"
                );
                return outcome;
            }
            Attempt::SetupFailed(_) => {
                tracing::debug!(
                    what,
                    attempt,
                    "bubblewrap failed to set the sandbox up; starting it again"
                );
                std::thread::sleep(SANDBOX_SETUP_PAUSE * attempt);
                attempt += 1;
            }
        }
    }
}

/// The proof that bubblewrap set a sandbox up: a pipe holding one byte, whose read end it gets
/// as `--block-fd`. Bubblewrap reads that byte once every mount is made, just before it starts
/// the program, and closes its copy; the program never holds the pipe. A byte still unread
/// after bubblewrap has ended means it died while setting up.
struct SetupWitness {
    read_end: OwnedFd,
}

impl SetupWitness {
    fn new() -> std::io::Result<SetupWitness> {
        let mut ends = [0; 2];
        // SAFETY: `ends` is a local array of two descriptors for the kernel to fill in.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two new descriptors that nothing else owns.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        // The byte is written now and the write end closed, so bubblewrap never waits.
        std::fs::File::from(write_end).write_all(b"1")?;
        Ok(SetupWitness { read_end })
    }

    /// Whether the byte is still in the pipe.
    fn unread(&self) -> bool {
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to a local.
        let status = unsafe { libc::ioctl(self.read_end.as_raw_fd(), libc::FIONREAD, &mut unread) };
        status == 0 && unread > 0
    }
}

/// Applied in the child before exec: keeps `fd` open across the exec, for bubblewrap.
fn inherit_descriptor(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: a plain fcntl on a descriptor the child inherited.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks until `pid` has exited, without reaping it, so its process group can still be
/// killed safely afterwards.
pub(crate) fn wait_exit_keeping_zombie(pid: u32) {
    let pid: libc::id_t = pid;
    loop {
        // SAFETY: `info` is a local the kernel fills in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let status = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if status == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Where `bwrap` is on the host's `PATH`, if anywhere.
pub fn find_bubblewrap() -> Option<PathBuf> {
    let path = std::env::var_os(env_vars::PATH)?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bwrap"))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One long-lived thread that starts every child of a backend.
///
/// A child's parent-death signal (bubblewrap's `--die-with-parent`, and ours) fires when the
/// *thread* that forked it ends, not the process. Tokio's blocking threads end after a few idle
/// seconds, which would kill a slot's interpreter between two cells; this thread lives as long
/// as the backend, so children die with the backend and not before.
struct Spawner {
    requests: mpsc::Sender<SpawnRequest>,
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

impl Spawner {
    fn start() -> std::io::Result<Spawner> {
        let (requests, inbox) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("rollbox-spawner".into())
            .spawn(move || {
                for (mut command, reply) in inbox {
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(Spawner { requests })
    }

    fn spawn(&self, command: Command) -> std::io::Result<Child> {
        let (reply, answer) = mpsc::channel();
        let gone = || std::io::Error::other("the spawner thread has stopped");
        self.requests.send((command, reply)).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

//! Rollback: a slot keeps its memory as it was before the running cell, so that a cell the host
//! has to stop (a trap: stuck in C code past its time limit, out of fuel, a crash) leaves the
//! slot as it was before that cell instead of empty.
//!
//! A slot's memory is the snapshot image mapped copy-on-write plus the pages the slot wrote
//! (`super::cow`). The image never changes, so the state before a cell is the image plus the
//! slot's own pages as they were then. A [`Checkpoint`] keeps a copy of exactly those pages, a
//! *shadow*, and brings it up to date before each cell with the pages written since the last
//! one. Which pages those are, the kernel tells, not the guest:
//!
//! - the memory's range is registered with a userfaultfd in asynchronous write-protect mode
//!   (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7): a write to a protected page is resolved by the kernel
//!   at once, with no thread of ours involved, and only clears the page's protection;
//! - `PAGEMAP_SCAN` on `/proc/self/pagemap` lists the slot's own pages (present, not the
//!   image's) that lost their protection, that is, were written, and protects them again, in
//!   one call.
//!
//! Rolling back is a fork from the shadow (see `factory::InterpreterFactory::roll_back`): a new
//! instance over the same image, the shadow's pages copied in, and a stack probe that must land
//! where the slot's did. Nothing the guest can reach decides which pages are copied.
//!
//! Costs (measured in BENCHMARKS.md): every cell pays the scan, a copy of each page it wrote,
//! and one minor fault for the first write to each protected page; the shadow doubles the
//! memory a slot owns. Where the kernel lacks either feature, [`WriteWatch::get`] says why and
//! slots run without rollback, as before.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use super::cow::PAGE;

/// `userfaultfd(2)`'s flag for a descriptor that handles faults of user code only.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_API: u64 = 0xAA;
/// Write-protect faults resolved by the kernel, with no reader of the descriptor (Linux 6.7).
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
/// Protect the pages the scan matches.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail instead of scanning memory that is not registered for asynchronous protection.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
/// How many ranges one scan call returns at most; a scan that fills them is continued.
const SCAN_BATCH: usize = 512;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// The process's one write watch: a userfaultfd in asynchronous write-protect mode, and
/// `/proc/self/pagemap` for the scans.
pub(crate) struct WriteWatch {
    uffd: OwnedFd,
    pagemap: File,
}

impl WriteWatch {
    /// The process's write watch, made on first use; `Err` says why this kernel cannot watch
    /// writes (then slots run without rollback).
    pub(crate) fn get() -> Result<&'static WriteWatch, &'static str> {
        static WATCH: OnceLock<Result<WriteWatch, String>> = OnceLock::new();
        WATCH
            .get_or_init(|| WriteWatch::open().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(String::as_str)
    }

    fn open() -> io::Result<WriteWatch> {
        // SAFETY: a plain system call with flags only; the result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            )
        };
        if fd < 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(error.kind(), format!("no userfaultfd ({error})")));
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the `UffdioApi` it is given, which lives across
        // the call.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(
                error.kind(),
                format!("no asynchronous write protection in userfaultfd (Linux 6.7 or later): {error}"),
            ));
        }
        let pagemap = File::open("/proc/self/pagemap")?;
        Ok(WriteWatch { uffd, pagemap })
    }

    /// Registers `len` bytes at `base` (page aligned, all mapped) for write protection. The
    /// registration lasts as long as the mappings do, and is inherited when they are split (a
    /// memory's growth changes the protection of part of its reservation).
    fn register(&self, base: usize, len: usize) -> io::Result<()> {
        let mut register = UffdioRegister {
            start: base as u64,
            len: len as u64,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the `UffdioRegister` it is given; the range
        // is the caller's own mapping.
        if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut register) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The page ranges of `len` bytes at `base` that the slot wrote since the last call (its
    /// own pages, present and not the image's, whose protection a write cleared), protecting
    /// them again. Offsets are from `base`.
    fn take_written(&self, base: usize, len: usize, written: &mut Vec<Range<usize>>) -> io::Result<()> {
        let mut regions = [PageRegion::default(); SCAN_BATCH];
        let mut start = base as u64;
        let end = (base + len) as u64;
        while start < end {
            let mut scan = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: SCAN_BATCH as u64,
                max_pages: 0,
                category_inverted: PAGE_IS_FILE,
                category_mask: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_FILE,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: PAGEMAP_SCAN reads the `PmScanArg` and writes at most `vec_len` regions
            // into `regions`, both alive across the call; it only changes the protection of
            // pages of the range, which this process owns.
            let found = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut scan) };
            if found < 0 {
                return Err(io::Error::last_os_error());
            }
            for region in &regions[..found as usize] {
                let range = (region.start - base as u64) as usize..(region.end - base as u64) as usize;
                match written.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => written.push(range),
                }
            }
            if scan.walk_end <= start {
                return Err(io::Error::other("the page scan made no progress"));
            }
            start = scan.walk_end;
        }
        Ok(())
    }
}

/// A slot's memory as it was before its running cell: the image under it, and a shadow copy of
/// every page the slot had written by then.
pub(crate) struct Checkpoint {
    watch: &'static WriteWatch,
    /// An anonymous mapping as large as the memory may grow, holding the slot's own pages at
    /// their offsets; only the pages in `saved` are meaningful (the rest are the image's).
    shadow: *mut u8,
    shadow_len: usize,
    /// One bit a page: the shadow holds that page.
    saved: Vec<u64>,
    /// The memory's size before the running cell.
    pub(crate) size: usize,
    /// Where the slot's turns make their door call (see `snapshot.rs`); a rolled-back instance
    /// must make them at the same place.
    pub(crate) stack_probe: u32,
    /// Why this cell cannot be rolled back, when it cannot (files open before it).
    pub(crate) unavailable: Option<String>,
    /// Scratch for the scans.
    written: Vec<Range<usize>>,
}

// SAFETY: the shadow mapping is owned by this value alone and only touched through `&mut self`
// (or `&self` for reads that no write can race with).
unsafe impl Send for Checkpoint {}

impl Checkpoint {
    /// Starts watching `memory` (`size` bytes now, at most `max_size`), whose pages at `own`
    /// hold the slot's own bytes, and takes its first checkpoint.
    pub(crate) fn start(
        watch: &'static WriteWatch,
        memory: &[u8],
        max_size: usize,
        own: &[Range<usize>],
        stack_probe: u32,
    ) -> io::Result<Checkpoint> {
        let base = memory.as_ptr() as usize;
        let shadow_len = max_size.max(memory.len()).next_multiple_of(PAGE);
        // SAFETY: a new private anonymous mapping at an address the kernel picks; it reserves
        // no memory until pages are written.
        let shadow = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                shadow_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if shadow == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut checkpoint = Checkpoint {
            watch,
            shadow: shadow.cast(),
            shadow_len,
            saved: vec![0; (shadow_len / PAGE).div_ceil(64)],
            size: memory.len(),
            stack_probe,
            unavailable: None,
            written: Vec::new(),
        };
        watch.register(base, max_size.max(memory.len()).next_multiple_of(PAGE))?;
        // Protect everything now, then save the pages the slot owns already.
        watch.take_written(base, memory.len(), &mut checkpoint.written)?;
        checkpoint.save(memory, own)?;
        Ok(checkpoint)
    }

    /// Brings the shadow up to `memory` as it is now (before a cell): every page written since
    /// the last update is copied in, and protected again.
    pub(crate) fn update(&mut self, memory: &[u8]) -> io::Result<()> {
        let started = std::time::Instant::now();
        let mut written = std::mem::take(&mut self.written);
        written.clear();
        let scanned = self
            .watch
            .take_written(memory.as_ptr() as usize, memory.len(), &mut written);
        let scan_us = started.elapsed().as_micros() as u64;
        let saved = scanned.and_then(|()| self.save(memory, &written));
        tracing::trace!(
            pages = written.iter().map(|r| r.len() / PAGE).sum::<usize>(),
            memory_mb = memory.len() >> 20,
            scan_us,
            total_us = started.elapsed().as_micros() as u64,
            "rollback checkpoint updated"
        );
        self.written = written;
        self.size = memory.len();
        saved
    }

    fn save(&mut self, memory: &[u8], ranges: &[Range<usize>]) -> io::Result<()> {
        for range in ranges {
            if range.end > memory.len() || range.end > self.shadow_len {
                return Err(io::Error::other("a written page past the end of the memory"));
            }
            // SAFETY: `range` lies inside the shadow mapping (checked above), which only this
            // value reaches, and does not overlap `memory`, a different mapping.
            let shadow = unsafe { std::slice::from_raw_parts_mut(self.shadow.add(range.start), range.len()) };
            shadow.copy_from_slice(&memory[range.clone()]);
            for page in range.start / PAGE..range.end.div_ceil(PAGE) {
                self.saved[page / 64] |= 1 << (page % 64);
            }
        }
        Ok(())
    }

    /// The shadow (as long as the memory was before the cell) and its saved page ranges.
    pub(crate) fn saved_pages(&self) -> (&[u8], Vec<Range<usize>>) {
        // SAFETY: the shadow mapping is `shadow_len` bytes, owned by this value, and `size`
        // never exceeds it.
        let shadow = unsafe { std::slice::from_raw_parts(self.shadow, self.size.min(self.shadow_len)) };
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for page in 0..shadow.len().div_ceil(PAGE) {
            if self.saved[page / 64] & (1 << (page % 64)) == 0 {
                continue;
            }
            let at = page * PAGE;
            let end = (at + PAGE).min(shadow.len());
            match ranges.last_mut() {
                Some(last) if last.end == at => last.end = end,
                _ => ranges.push(at..end),
            }
        }
        (shadow, ranges)
    }

    /// Watches `memory` instead, a new instance's whose bytes are this checkpoint's (after a
    /// rollback): the shadow stays right as it is.
    pub(crate) fn rewatch(&mut self, memory: &[u8], max_size: usize) -> io::Result<()> {
        let base = memory.as_ptr() as usize;
        self.watch
            .register(base, max_size.max(memory.len()).next_multiple_of(PAGE))?;
        self.written.clear();
        let mut written = std::mem::take(&mut self.written);
        let protected = self.watch.take_written(base, memory.len(), &mut written);
        self.written = written;
        protected
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: the whole shadow mapping, made by `start` and owned by this value alone.
        unsafe {
            libc::munmap(self.shadow.cast(), self.shadow_len);
        }
    }
}

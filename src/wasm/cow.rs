//! Copy-on-write linear memory: every slot's memory is a private mapping of a shared, read-only
//! *memory image* (a sealed memfd, or a file in the cache), so slots share every page they have
//! not written and own only the pages they have.
//!
//! - [`MemoryImage`]: a linear memory's bytes, kept in a file no one can write: a memfd sealed
//!   against writes, or a cache file written once and renamed into place. Pages that are all
//!   zero are holes: they take no memory, and read as zero.
//! - [`ImageMemoryCreator`]: wasmtime's memory creator for this engine. Each linear memory is a
//!   `PROT_NONE` reservation (the size and guard wasmtime asks for) whose accessible part grows
//!   by `mprotect`, as wasmtime's own memories do.
//! - [`map_image`]: puts an image under a new instance's memory, before any guest code runs,
//!   with `mmap(MAP_PRIVATE | MAP_FIXED)`. Writes then go to the slot's own anonymous pages;
//!   the image never changes (the kernel refuses writes to a sealed memfd, and a private mapping
//!   never writes back).
//! - [`written_pages`]: which pages of a mapped memory the slot has written, read from
//!   `/proc/self/pagemap`: a written page of a private file mapping is anonymous, an unwritten
//!   one is the file's. A fork copies only those.
//! - [`WriteHistory`]: the pages the first slots of an image wrote in their first cells.
//!   [`copy_hot_pages`] makes a restored slot's own copies of the pages most of them wrote
//!   at once, before any guest code runs (see [`WriteHistory`] for why).
//!
//! The runtime module is compiled without its data segments (`super::runtime::code_only`), so
//! instantiation writes nothing into memory: the image is the only source of its bytes.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use wasmtime::{AsContextMut, LinearMemory, Memory, MemoryCreator, MemoryType};

use super::interpreter::RestoreError;

/// The host page: what is shared or owned, and the unit of a hole in an image.
pub(crate) const PAGE: usize = 4096;
/// Wasm's page: memory grows in these.
const WASM_PAGE: usize = 64 << 10;
static ZEROES: [u8; PAGE] = [0; PAGE];

/// A linear memory's bytes in a file that nothing writes once it is made.
#[derive(Debug)]
pub(crate) struct MemoryImage {
    file: File,
    size: usize,
    /// Bytes in pages that are not all zero: what the image holds in memory or on disk.
    data_bytes: usize,
    /// The pages its first slots wrote in their first cells.
    history: std::sync::Mutex<WriteHistory>,
}

impl MemoryImage {
    /// An image of `bytes` in a new memfd, sealed so that it can never change again.
    pub(crate) fn from_bytes(name: &str, bytes: &[u8]) -> io::Result<MemoryImage> {
        let file = memfd(name)?;
        let data_bytes = write_pages(&file, bytes)?;
        // SAFETY: fcntl on a descriptor this function owns; the arguments are plain flags.
        let sealed = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if sealed != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(MemoryImage {
            file,
            size: bytes.len(),
            data_bytes,
            history: Default::default(),
        })
    }

    /// Writes `bytes` as an image file at `path` (a private file, then renamed into place, so a
    /// reader never sees half of one) and opens it read-only.
    pub(crate) fn create_file(path: &Path, bytes: &[u8]) -> io::Result<MemoryImage> {
        let partial = staging_path(path, "partial");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let written = File::create(&partial)
            .and_then(|file| write_pages(&file, bytes).and_then(|_| file.sync_all()))
            .and_then(|()| std::fs::rename(&partial, path));
        if let Err(error) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
        MemoryImage::open(path)
    }

    /// An image file written by [`MemoryImage::create_file`], opened read-only.
    pub(crate) fn open(path: &Path) -> io::Result<MemoryImage> {
        let file = File::open(path)?;
        let metadata = file.metadata()?;
        let size = usize::try_from(metadata.len()).map_err(|_| io::Error::other("the image is too large"))?;
        if !size.is_multiple_of(WASM_PAGE) {
            return Err(io::Error::other(format!(
                "{size} bytes is not a whole number of wasm pages"
            )));
        }
        // Blocks of 512 bytes, as stat counts them: what the holes leave.
        let data_bytes = usize::try_from(std::os::unix::fs::MetadataExt::blocks(&metadata) * 512).unwrap_or(size);
        Ok(MemoryImage {
            file,
            size,
            data_bytes: data_bytes.min(size),
            history: Default::default(),
        })
    }

    /// Whether the image still learns which pages its slots write ([`WriteHistory`]).
    pub(crate) fn learns_writes(&self) -> bool {
        lock(&self.history).learning()
    }

    /// Counts the pages (`ranges`, as [`written_pages`] gives them) a slot of this image has
    /// written by the end of its first cells.
    pub(crate) fn learn_writes(&self, ranges: &[Range<usize>]) {
        lock(&self.history).learn(ranges, self.size);
    }

    /// The memory's size, in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// The bytes the image keeps (its pages that are not all zero).
    pub(crate) fn data_bytes(&self) -> usize {
        self.data_bytes
    }
}

/// A private name beside `path` to write a file under before it is renamed into place: unique
/// per process *and* per call. Two backends of one process (parallel tests) took the same
/// snapshot at once and, with the process id alone, wrote the same partial file: one renamed
/// the other's half-written image into place, and slots restored from it printed nothing.
pub(crate) fn staging_path(path: &Path, label: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{label}-{}-{call}", std::process::id()));
    path.with_file_name(name)
}

fn memfd(name: &str) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a valid C string and plain flags; the descriptor returned is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Sizes `file` to `bytes` and writes its pages that are not all zero; the rest stay holes.
/// Returns the bytes written.
fn write_pages(file: &File, bytes: &[u8]) -> io::Result<usize> {
    file.set_len(bytes.len() as u64)?;
    let mut written = 0;
    let mut run: Option<usize> = None;
    let mut flush = |start: usize, end: usize| -> io::Result<()> {
        file.write_all_at(&bytes[start..end], start as u64)?;
        written += end - start;
        Ok(())
    };
    for (index, page) in bytes.chunks(PAGE).enumerate() {
        let at = index * PAGE;
        let zero = page == &ZEROES[..page.len()];
        match (run, zero) {
            (None, false) => run = Some(at),
            (Some(start), true) => {
                flush(start, at)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        flush(start, bytes.len())?;
    }
    Ok(written)
}

/// Grows `memory` (a new instance's, never run) to `image`'s size through the store's limiter,
/// then maps `image` over it, privately: from here on the memory reads the image's bytes, and
/// every page the guest writes becomes the slot's own.
pub(crate) fn map_image(mut store: impl AsContextMut, memory: Memory, image: &MemoryImage) -> Result<(), RestoreError> {
    let current = memory.data_size(&store);
    if current > image.size {
        return Err(RestoreError::Larger {
            current,
            snapshot: image.size,
        });
    }
    if image.size > current {
        let pages = (image.size - current).div_ceil(WASM_PAGE) as u64;
        memory
            .grow(&mut store, pages)
            .map_err(|e| RestoreError::Grow(e.into_boxed_dyn_error()))?;
    }
    if image.size == 0 {
        return Ok(());
    }
    let base = memory.data_ptr(&store);
    // SAFETY: `base..base + image.size` is the accessible start of this memory's reservation,
    // made by `ImageMemoryCreator` (the only creator of this engine) and page aligned. The
    // caller holds the store mutably and no guest code has run in the new instance, so no
    // reference into these bytes exists while they are replaced. MAP_FIXED swaps the pages in
    // one step; the reservation around them is untouched.
    let mapped = unsafe {
        libc::mmap(
            base.cast(),
            image.size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            image.file.as_raw_fd(),
            0,
        )
    };
    if mapped == libc::MAP_FAILED || mapped != base.cast() {
        return Err(RestoreError::Map(io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes the slot's own copies, at once, of the pages of `memory` (mapped from `image` by
/// [`map_image`], before any guest code runs in it) that most of the image's learned
/// slots wrote (see [`WriteHistory`]). Only the pages' owner changes, not their bytes. A kernel
/// without `MADV_POPULATE_WRITE` (before 5.14) answers `EINVAL`, and the pages are copied at
/// their first write instead, as without this.
///
/// Returns false when the image has no hot pages yet (it is still learning them), true when the
/// slot got its copies.
pub(crate) fn copy_hot_pages(memory: &mut [u8], image: &MemoryImage) -> bool {
    let hot = lock(&image.history).hot.clone();
    if hot.is_empty() {
        return false;
    }
    let len = memory.len();
    for range in hot.iter().filter(|range| range.end <= len) {
        // SAFETY: the range lies inside `memory`, held mutably here, so nothing reads or writes
        // these bytes while their pages change owner; their bytes stay the same.
        unsafe {
            libc::madvise(
                memory[range.start..].as_mut_ptr().cast(),
                range.len(),
                MADV_POPULATE_WRITE,
            );
        }
    }
    true
}

/// `madvise` advice (Linux 5.14): fault the range in writable, as writes would.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// The most pages a restored slot copies at once (8 MiB). What the first slots write decides the
/// hot pages, and those slots run the model's code: without a bound, slots that each wrote
/// 100 MB in their first cells would make every later slot own 100 MB. Slots of the default
/// profile write a few hundred pages at their start (BENCHMARKS.md, "Session 8").
const MAX_HOT_PAGES: usize = 2048;

/// How many slots of an image [`WriteHistory`] learns from.
const LEARNED_SLOTS: u16 = 32;

/// A slot teaches [`WriteHistory`] the pages it has written by the end of this many cells (or
/// by its end, when it runs fewer).
pub(crate) const LEARNED_CELLS: u32 = 3;

/// The pages the first [`LEARNED_SLOTS`] slots of an image wrote in their first
/// [`LEARNED_CELLS`] cells, and the *hot* ones: those at least half of them wrote.
///
/// Why: a slot's first write to a page it shares with the image is a copy-on-write fault, and
/// when the page was read first (CPython reads an object before it changes its reference
/// count), the kernel must also flush the old mapping from every CPU's TLB that may hold it: an
/// interrupt to each other CPU running a thread of this process. On this VM those interrupts
/// took 46% of the CPU of a `--group-size 8` rollout (`perf`: `do_wp_page`, `flush_tlb_mm_range`,
/// `x2apic_send_IPI`). A page made the slot's own before any guest code runs has no mapping to
/// flush. Slots of the same image write much the same pages at the start (the fresh-slot turn,
/// the first cells), so the pages most of the first slots wrote by then are copied at once
/// for every later slot restored from the image, with `MADV_POPULATE_WRITE`. Learning only the
/// first cells keeps that to pages a slot that runs a few cells writes anyway: learned over the
/// slots' whole lives instead, an idle slot held 4.9 MB PSS against 1.6 MB (BENCHMARKS.md).
/// Only slots restored without the copies are counted, and the hot pages are published once
/// [`LEARNED_SLOTS`] are: a slot that got them would report them all as written. Learning then
/// stops, so it costs a `pagemap` read in only that many slots.
#[derive(Debug, Default)]
pub(crate) struct WriteHistory {
    /// Slots counted.
    slots: u16,
    /// For each page of the image, how many of them wrote it.
    writers: Vec<u16>,
    /// The page ranges at least half of them wrote: what a new slot copies at once. Empty until
    /// all of them are counted.
    hot: std::sync::Arc<[Range<usize>]>,
}

impl WriteHistory {
    fn learning(&self) -> bool {
        self.slots < LEARNED_SLOTS
    }

    /// Counts one slot's written `ranges` of an image of `image_size` bytes; pages past the
    /// image (memory the slot grew) are left out.
    fn learn(&mut self, ranges: &[Range<usize>], image_size: usize) {
        if !self.learning() {
            return;
        }
        let pages = image_size / PAGE;
        self.writers.resize(pages, 0);
        for range in ranges {
            for page in range.start / PAGE..range.end.div_ceil(PAGE).min(pages) {
                self.writers[page] += 1;
            }
        }
        self.slots += 1;
        // Published only once all are counted: a slot that got the copies would report them
        // as written, so the first slots' pages would count again in every later one.
        if self.learning() {
            return;
        }
        let most = self.slots.div_ceil(2);
        let mut pages: Vec<usize> = (0..self.writers.len())
            .filter(|&page| self.writers[page] >= most)
            .collect();
        if pages.len() > MAX_HOT_PAGES {
            // The most written first; a page's place breaks ties, so the choice is the same
            // every time.
            pages.sort_by_key(|&page| (std::cmp::Reverse(self.writers[page]), page));
            pages.truncate(MAX_HOT_PAGES);
            pages.sort_unstable();
        }
        let mut hot: Vec<Range<usize>> = Vec::new();
        for page in pages {
            let at = page * PAGE;
            match hot.last_mut() {
                Some(last) if last.end == at => last.end = at + PAGE,
                _ => hot.push(at..at + PAGE),
            }
        }
        self.hot = hot.into();
    }
}

fn lock(history: &std::sync::Mutex<WriteHistory>) -> std::sync::MutexGuard<'_, WriteHistory> {
    history.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The page ranges of `bytes` (a memory mapped by [`map_image`] from an image of
/// `image_size` bytes) that hold something other than the image: the pages the slot wrote
/// (anonymous once written), and any page past the image that was touched. Read from
/// `/proc/self/pagemap`, one entry of 8 bytes per page.
pub(crate) fn written_pages(bytes: &[u8], image_size: usize) -> io::Result<Vec<Range<usize>>> {
    /// Bit 63: the page is in memory; bit 62: swapped out (only anonymous pages are, here);
    /// bit 61: a file page (the image's, not written).
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    let base = bytes.as_ptr() as usize;
    if !base.is_multiple_of(PAGE) {
        return Err(io::Error::other("the memory is not page aligned"));
    }
    let pages = bytes.len().div_ceil(PAGE);
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut entries, (base / PAGE * 8) as u64)?;
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for (index, entry) in entries.chunks_exact(8).enumerate() {
        let entry = u64::from_le_bytes(entry.try_into().unwrap_or_default());
        let at = index * PAGE;
        let written = if at < image_size {
            (entry & PRESENT != 0 && entry & FILE == 0) || entry & SWAPPED != 0
        } else {
            entry & (PRESENT | SWAPPED) != 0
        };
        if !written {
            continue;
        }
        let end = (at + PAGE).min(bytes.len());
        match ranges.last_mut() {
            Some(last) if last.end == at => last.end = end,
            _ => ranges.push(at..end),
        }
    }
    Ok(ranges)
}

/// Copies `ranges` (page aligned, as [`written_pages`] gives them) of `source` into `target`,
/// a memory mapped by [`map_image`]. Each range of `target` is first replaced by fresh
/// anonymous pages, populated in one call: writing into the image's pages would fault each
/// one in from the image and then copy it, twice the work for bytes about to be overwritten.
pub(crate) fn copy_pages(source: &[u8], target: &mut [u8], ranges: &[Range<usize>]) -> io::Result<()> {
    for range in ranges {
        if range.end > source.len() || range.end > target.len() {
            return Err(io::Error::other("a page range past the end of a memory"));
        }
        let start = target[range.start..].as_mut_ptr();
        if !(start as usize).is_multiple_of(PAGE) {
            return Err(io::Error::other("a page range that is not page aligned"));
        }
        // SAFETY: `start..start + len` lies inside `target`, a memory this function holds
        // mutably, so no other reference reads these bytes while their pages are replaced; the
        // range is overwritten right after.
        let mapped = unsafe {
            libc::mmap(
                start.cast(),
                range.len().next_multiple_of(PAGE),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        target[range.clone()].copy_from_slice(&source[range.clone()]);
    }
    Ok(())
}

/// The memory creator of every rollbox engine: reservations that [`map_image`] can map images
/// into. See the module's documentation.
pub(crate) struct ImageMemoryCreator;

// SAFETY: each memory is a fresh reservation of `reserved + guard` bytes, PROT_NONE except its
// accessible part, zero-filled (fresh anonymous pages), never moved (`byte_capacity` is the
// whole reservation), and unmapped only when dropped.
unsafe impl MemoryCreator for ImageMemoryCreator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        // Without a size from wasmtime, reserve the most a 32-bit memory can address.
        let capacity = reserved_size_in_bytes.unwrap_or_else(|| maximum.unwrap_or(4 << 30));
        let reservation = capacity
            .checked_add(guard_size_in_bytes)
            .ok_or("the memory reservation overflows")?;
        if minimum > capacity {
            return Err(format!(
                "a memory of {minimum} bytes does not fit its reservation of {capacity}"
            ));
        }
        // SAFETY: a new private anonymous mapping at an address the kernel picks.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reservation,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("failed to reserve memory: {}", io::Error::last_os_error()));
        }
        let mut memory = ReservedMemory {
            base: base as usize,
            reservation,
            capacity,
            accessible: 0,
        };
        memory.grow_to(minimum).map_err(|e| e.to_string())?;
        Ok(Box::new(memory))
    }
}

/// One linear memory: `reservation` bytes at `base`, the first `accessible` of them readable
/// and writable.
struct ReservedMemory {
    base: usize,
    reservation: usize,
    capacity: usize,
    accessible: usize,
}

// SAFETY: the memory is only reached through wasmtime's store, which serialises access.
unsafe impl LinearMemory for ReservedMemory {
    fn byte_size(&self) -> usize {
        self.accessible
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.capacity {
            wasmtime::bail!("{new_size} bytes is past the memory's reservation of {}", self.capacity);
        }
        if new_size > self.accessible {
            let start = self.accessible.next_multiple_of(PAGE);
            let end = new_size.next_multiple_of(PAGE);
            if end > start {
                // SAFETY: `start..end` lies inside this memory's reservation.
                let protected = unsafe {
                    libc::mprotect(
                        (self.base + start) as *mut libc::c_void,
                        end - start,
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                if protected != 0 {
                    return Err(io::Error::last_os_error().into());
                }
            }
            self.accessible = new_size;
        }
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }
}

impl Drop for ReservedMemory {
    fn drop(&mut self) {
        // SAFETY: the whole reservation, mapped by `new_memory` and owned by this value alone.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.reservation);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[allow(clippy::single_range_in_vec_init, reason = "lists of page ranges, some of one range")]
    fn the_hot_pages_are_those_half_the_learned_slots_wrote() {
        let mut history = super::WriteHistory::default();
        let image = 8 * PAGE;
        history.learn(&[0..2 * PAGE, 5 * PAGE..6 * PAGE], image);
        history.learn(&[PAGE..3 * PAGE, 7 * PAGE..9 * PAGE], image);
        history.learn(&[PAGE..2 * PAGE], image);
        assert!(history.hot.is_empty(), "nothing is published while learning");
        for _ in 3..super::LEARNED_SLOTS - 1 {
            history.learn(&[PAGE..2 * PAGE, 4 * PAGE..5 * PAGE], image);
        }
        assert!(history.hot.is_empty(), "one slot short");
        history.learn(&[PAGE..2 * PAGE, 4 * PAGE..5 * PAGE, 6 * PAGE..7 * PAGE], image);
        assert!(!history.learning(), "learning stops");
        // Page 1 by all 32 and page 4 by 29, at least half; pages 0, 2, 5, 6 and 7 by one each
        // (8 is past the image).
        assert_eq!(
            &*history.hot,
            &[PAGE..2 * PAGE, 4 * PAGE..5 * PAGE],
            "{:?}",
            history.writers
        );
        history.learn(&[0..8 * PAGE], image);
        assert_eq!(history.slots, super::LEARNED_SLOTS, "a later slot is not counted");
        assert_eq!(&*history.hot, &[PAGE..2 * PAGE, 4 * PAGE..5 * PAGE]);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init, reason = "lists of page ranges, some of one range")]
    fn slots_that_write_much_make_later_slots_copy_no_more_than_the_bound() {
        let mut history = super::WriteHistory::default();
        let pages = super::MAX_HOT_PAGES + 100;
        let image = pages * PAGE;
        // Every slot writes every page, so all are hot and tie: the lowest pages are kept.
        for _ in 0..super::LEARNED_SLOTS {
            history.learn(&[0..image], image);
        }
        assert_eq!(&*history.hot, &[0..super::MAX_HOT_PAGES * PAGE]);
    }

    use super::*;

    #[test]
    fn an_image_keeps_only_pages_that_are_not_zero_and_cannot_be_written() {
        let mut bytes = vec![0u8; 4 * WASM_PAGE];
        bytes[5] = 1;
        bytes[3 * WASM_PAGE + 7] = 2;
        let image = MemoryImage::from_bytes("test", &bytes).unwrap();
        assert_eq!(image.size(), 4 * WASM_PAGE);
        assert_eq!(image.data_bytes(), 2 * PAGE);
        let mut back = vec![9u8; bytes.len()];
        image.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, bytes);
        // Sealed: not even its maker can change it.
        assert!(image.file.write_at(&[1], 0).is_err());
        assert!(image.file.set_len(0).is_err());
    }

    #[test]
    fn an_image_file_round_trips_with_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.img");
        let mut bytes = vec![0u8; 2 * WASM_PAGE];
        bytes[WASM_PAGE + 1] = 7;
        let image = MemoryImage::create_file(&path, &bytes).unwrap();
        assert_eq!(image.size(), 2 * WASM_PAGE);
        let again = MemoryImage::open(&path).unwrap();
        let mut back = vec![0u8; bytes.len()];
        again.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, bytes);
        std::fs::write(dir.path().join("odd.img"), [1u8; 10]).unwrap();
        assert!(MemoryImage::open(&dir.path().join("odd.img")).is_err());
    }
}

//! The runtime compiled to native code once and kept as a `.cwasm` file, with its initial
//! memory beside it as a memory image.
//!
//! What is compiled is the runtime *without its data*: every active data segment is emptied
//! (see [`split_data`]), so instantiating it writes nothing into memory. The bytes those
//! segments held are laid out once into the module's initial memory, kept as a sparse image
//! file, which every fresh interpreter maps copy-on-write (see `crate::wasm::cow`).
//!
//! The cache key covers the pinned wasm's sha256 and wasmtime's own compatibility hash of the
//! engine (its version and every setting that changes the code), so a new wasmtime or a
//! different engine configuration never loads a stale artifact. A file lock keeps parallel
//! processes from compiling the same module at once.

use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use super::install::hex;
use super::{InstalledRuntime, RuntimeError, RuntimeOptions, io_err, pinned};
use crate::reporter::Reporter;
use crate::wasm::cow::MemoryImage;

/// Changes whenever [`split_data`] would give a different module or image, so an older cache
/// entry is never loaded.
pub(crate) const SPLIT_VERSION: &str = "code-only-1";

/// `{stem}-{digest}`: the digest is 128 bits (hex) of a sha256 over the pinned runtime's sha256
/// and what `key` feeds it. The name of a cache file that no process loads once any of them
/// changes.
pub(crate) fn keyed_name(stem: &str, key: impl FnOnce(&mut Sha256Hasher)) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    pinned().artifacts.snapshot.sha256.hash(&mut hasher);
    key(&mut hasher);
    format!("{stem}-{}", &hex(&hasher.0.finalize())[..32])
}

/// Where the compiled snapshot for `engine` is cached.
pub fn compiled_path(options: &RuntimeOptions, engine: &Engine) -> PathBuf {
    let name = keyed_name("python-snapshot", |key| {
        SPLIT_VERSION.hash(key);
        INTERRUPT_EXPORT.hash(key);
        engine.precompile_compatibility_hash().hash(key);
    });
    options.cache_dir.join("compiled").join(format!("{name}.cwasm"))
}

/// Where the guest module's compiled code (`guest/rollbox_guest.py`, marshalled by the runtime's
/// own CPython) is cached: keyed by the runtime and the guest's source, so a new runtime or a
/// changed guest never loads stale code.
pub fn guest_code_path(options: &RuntimeOptions) -> PathBuf {
    let name = keyed_name("rollbox-guest", |key| crate::slot::cell::GUEST_SOURCE.hash(key));
    options.cache_dir.join("compiled").join(format!("{name}.marshal"))
}

/// Where the runtime's initial memory image is cached (the same for every engine).
pub fn initial_memory_path(options: &RuntimeOptions) -> PathBuf {
    let name = keyed_name("python-memory", |key| SPLIT_VERSION.hash(key));
    options.cache_dir.join("compiled").join(format!("{name}.img"))
}

/// The runtime ready to instantiate: its code, and the memory a fresh instance starts with.
pub(crate) struct CompiledRuntime {
    /// The runtime without its data segments.
    pub(crate) module: Module,
    /// The memory its data segments would have made.
    pub(crate) initial_memory: MemoryImage,
}

/// The runtime for `engine`: loaded from the cache, or split, compiled and cached first.
pub(crate) fn load_or_compile(
    engine: &Engine,
    runtime: &InstalledRuntime,
    options: &RuntimeOptions,
    reporter: &dyn Reporter,
) -> Result<CompiledRuntime, RuntimeError> {
    let module = load_or_compile_module(engine, runtime, options, reporter)?;
    let image_path = initial_memory_path(options);
    let initial_memory = match MemoryImage::open(&image_path) {
        Ok(image) => image,
        Err(_) => {
            let wasm = fs::read(&runtime.snapshot).map_err(io_err("read", &runtime.snapshot))?;
            let (_, memory) = split_data(&wasm).map_err(|e| RuntimeError::Compile {
                path: runtime.snapshot.clone(),
                source: e.into(),
            })?;
            MemoryImage::create_file(&image_path, &memory).map_err(io_err("write", &image_path))?
        }
    };
    Ok(CompiledRuntime { module, initial_memory })
}

fn load_or_compile_module(
    engine: &Engine,
    runtime: &InstalledRuntime,
    options: &RuntimeOptions,
    reporter: &dyn Reporter,
) -> Result<Module, RuntimeError> {
    let path = compiled_path(options, engine);
    if let Some(module) = try_load(engine, &path) {
        return Ok(module);
    }
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let lock_path = path.with_extension("lock");
    let lock = File::create(&lock_path).map_err(io_err("create", &lock_path))?;
    lock.lock().map_err(io_err("lock", &lock_path))?;
    // Another process may have compiled it while this one waited for the lock.
    if let Some(module) = try_load(engine, &path) {
        return Ok(module);
    }
    let wasm = fs::read(&runtime.snapshot).map_err(io_err("read", &runtime.snapshot))?;
    let compile_error = |e: Box<dyn std::error::Error + Send + Sync>| RuntimeError::Compile {
        path: runtime.snapshot.clone(),
        source: e,
    };
    let (code_only, _) = split_data(&wasm).map_err(|e| compile_error(e.into()))?;
    let code_only = match with_interrupt_export(&code_only).map_err(|e| compile_error(e.into()))? {
        Some(exported) => exported,
        None => {
            tracing::warn!(
                "the runtime has no `{INTERRUPT_FUNCTION}` in its name section: a cell past its time limit is stopped \
                 with its state lost, never interrupted first"
            );
            code_only
        }
    };
    reporter.on_step_start("compiling the Python runtime (once; about a minute)", None);
    let compiled = engine
        .precompile_module(&code_only)
        .map_err(|e| RuntimeError::Compile {
            path: runtime.snapshot.clone(),
            source: e.into_boxed_dyn_error(),
        })?;
    reporter.on_step_end();
    let staging = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&staging, &compiled).map_err(io_err("write", &staging))?;
    fs::rename(&staging, &path).map_err(io_err("move into place", &path))?;
    try_load(engine, &path).ok_or_else(|| RuntimeError::CorruptCache {
        path: path.clone(),
        reason: "the freshly compiled module could not be loaded".into(),
    })
}

fn try_load(engine: &Engine, path: &Path) -> Option<Module> {
    if !path.is_file() {
        return None;
    }
    // SAFETY: only files rollbox itself wrote, complete (written elsewhere, then renamed), into
    // the user's own cache folder are loaded; wasmtime checks the header and the engine
    // compatibility, and a file that fails is recompiled.
    match unsafe { Module::deserialize_file(engine, path) } {
        Ok(module) => Some(module),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cached compiled runtime is unusable; recompiling");
            None
        }
    }
}

/// Splits a module into its code (the module with every active data segment emptied; passive
/// segments, which only code copies, stay) and the initial memory its active segments make:
/// the memory's minimum size, zero but for the segments' bytes at their offsets. The module
/// must have one memory whose segments are placed by constant `i32.const` offsets, as the
/// runtime's are.
pub(crate) fn split_data(wasm: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SplitError> {
    use wasmparser::{DataKind, Operator, Parser, Payload};
    let mut memory_size = None;
    let mut data_section = None;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::MemorySection(reader) => {
                for memory in reader {
                    let memory = memory?;
                    if memory.memory64 || memory.shared || memory_size.is_some() {
                        return Err(SplitError::Shape("more than one plain 32-bit memory"));
                    }
                    let pages = usize::try_from(memory.initial).map_err(|_| SplitError::Shape("a huge memory"))?;
                    memory_size = Some(pages.checked_mul(64 << 10).ok_or(SplitError::Shape("a huge memory"))?);
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    if matches!(import?.ty, wasmparser::TypeRef::Memory(_)) {
                        return Err(SplitError::Shape("an imported memory"));
                    }
                }
            }
            Payload::DataSection(reader) => data_section = Some(reader),
            _ => {}
        }
    }
    let size = memory_size.ok_or(SplitError::Shape("no memory"))?;
    let mut memory = vec![0u8; size];
    let Some(reader) = data_section else {
        return Ok((wasm.to_vec(), memory));
    };
    let section = reader.range();
    let mut payload = Vec::new();
    leb(&mut payload, reader.count() as usize);
    for data in reader {
        let data = data?;
        match data.kind {
            DataKind::Passive => {
                payload.push(1);
                leb(&mut payload, data.data.len());
                payload.extend_from_slice(data.data);
            }
            DataKind::Active {
                memory_index,
                offset_expr,
            } => {
                let mut operators = offset_expr.get_operators_reader();
                let offset = match (operators.read()?, operators.read()?) {
                    (Operator::I32Const { value }, Operator::End) if memory_index == 0 => value as u32 as usize,
                    _ => return Err(SplitError::Shape("a data segment not at a constant offset")),
                };
                let end = offset
                    .checked_add(data.data.len())
                    .filter(|end| *end <= size)
                    .ok_or(SplitError::Shape("a data segment past the initial memory"))?;
                memory[offset..end].copy_from_slice(data.data);
                // The same segment with no bytes: instantiation writes nothing, and the
                // segment (dropped after instantiation either way) keeps its index.
                payload.push(0);
                payload.push(0x41); // i32.const
                sleb(&mut payload, i64::from(offset as u32 as i32));
                payload.push(0x0b); // end
                leb(&mut payload, 0);
            }
        }
    }
    Ok((replace_section(wasm, SECTION_DATA, section, &payload)?, memory))
}

/// The name under which [`with_interrupt_export`] exports CPython's `PyErr_SetInterruptEx`.
pub(crate) const INTERRUPT_EXPORT: &str = "rollbox_interrupt";
/// The C function a time limit calls first: it marks a signal pending, as a signal handler
/// would, and CPython raises `KeyboardInterrupt` at its next check (async-signal-safe by its
/// documentation, so calling it while the interpreter is stopped anywhere is sound).
const INTERRUPT_FUNCTION: &str = "PyErr_SetInterruptEx";
const SECTION_EXPORT: u8 = 7;
const SECTION_DATA: u8 = 11;
const EXTERNAL_KIND_FUNC: u8 = 0;

/// `wasm` with one more export, [`INTERRUPT_EXPORT`], of the function the `name` section calls
/// `PyErr_SetInterruptEx`, so that the host can interrupt a running cell the way Jupyter does.
/// `None` when the module has no such function (or no names): time limits then trap at once.
pub(crate) fn with_interrupt_export(wasm: &[u8]) -> Result<Option<Vec<u8>>, SplitError> {
    use wasmparser::{KnownCustom, Name, Parser, Payload};
    let mut exports = None;
    let mut function = None;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::ExportSection(reader) => {
                for export in reader.clone() {
                    if export?.name == INTERRUPT_EXPORT {
                        return Err(SplitError::Shape("an export named like rollbox's interrupt"));
                    }
                }
                exports = Some((reader.count(), reader.range()));
            }
            Payload::CustomSection(reader) => {
                if let KnownCustom::Name(names) = reader.as_known() {
                    for name in names {
                        let Name::Function(map) = name? else { continue };
                        for naming in map {
                            let naming = naming?;
                            if naming.name == INTERRUPT_FUNCTION {
                                function = Some(naming.index);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let (Some((count, range)), Some(index)) = (exports, function) else {
        return Ok(None);
    };
    let old_count_bytes = leb_len(count as usize);
    let mut payload = Vec::with_capacity(range.len() + 32);
    leb(&mut payload, count as usize + 1);
    payload.extend_from_slice(&wasm[range.start + old_count_bytes..range.end]);
    leb(&mut payload, INTERRUPT_EXPORT.len());
    payload.extend_from_slice(INTERRUPT_EXPORT.as_bytes());
    payload.push(EXTERNAL_KIND_FUNC);
    leb(&mut payload, index as usize);
    replace_section(wasm, SECTION_EXPORT, range, &payload).map(Some)
}

/// `wasm` with the contents of its section `id` (at `range`) replaced by `payload`.
fn replace_section(wasm: &[u8], id: u8, range: std::ops::Range<usize>, payload: &[u8]) -> Result<Vec<u8>, SplitError> {
    // The section's id and its size (a LEB128 of 1 to 5 bytes) come just before its contents.
    let header_start = (1..=5)
        .filter_map(|size_bytes| range.start.checked_sub(size_bytes + 1))
        .find(|&at| wasm[at] == id && read_leb(&wasm[at + 1..range.start]) == Some(range.len()))
        .ok_or(SplitError::Shape("a section whose header cannot be found"))?;
    let mut out = Vec::with_capacity(wasm.len() - range.len() + payload.len() + 5);
    out.extend_from_slice(&wasm[..header_start]);
    out.push(id);
    leb(&mut out, payload.len());
    out.extend_from_slice(payload);
    out.extend_from_slice(&wasm[range.end..]);
    Ok(out)
}

/// How many bytes the unsigned LEB128 of `value` takes.
fn leb_len(value: usize) -> usize {
    let mut out = Vec::new();
    leb(&mut out, value);
    out.len()
}

/// The runtime could not be split into code and initial memory.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The module does not parse.
    #[error("failed to parse the runtime module")]
    Parse(#[from] wasmparser::BinaryReaderError),
    /// The module has a shape the split does not handle.
    #[error("the runtime module has {0}, which rollbox cannot map copy-on-write")]
    Shape(&'static str),
}

fn leb(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The unsigned LEB128 that is exactly `bytes`, if it is one.
fn read_leb(bytes: &[u8]) -> Option<usize> {
    let mut value = 0usize;
    for (index, &byte) in bytes.iter().enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return (index + 1 == bytes.len()).then_some(value);
        }
    }
    None
}

fn sleb(out: &mut Vec<u8>, mut value: i64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let done = (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0);
        if done {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Feeds `Hash` input into sha256, so the key is stable across processes and Rust versions.
pub(crate) struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0 // never read: the key is the sha256 digest
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: [u8; 8] = [0, b'a', b's', b'm', 1, 0, 0, 0];
    /// One memory of one page.
    const MEMORY: [u8; 5] = [5, 3, 1, 0, 1];

    #[test]
    fn split_data_empties_active_segments_into_the_initial_memory_and_keeps_passive_ones() {
        let module = [
            &HEADER[..],
            &MEMORY,
            // Two segments: "hi" active at 16, "zz" passive.
            &[11, 12, 2, 0, 0x41, 16, 0x0b, 2, b'h', b'i', 1, 2, b'z', b'z'],
        ]
        .concat();
        let (code_only, memory) = split_data(&module).unwrap();
        let expected = [
            &HEADER[..],
            &MEMORY,
            &[11, 10, 2, 0, 0x41, 16, 0x0b, 0, 1, 2, b'z', b'z'],
        ]
        .concat();
        assert_eq!(code_only, expected);
        assert_eq!(memory.len(), 64 << 10);
        assert_eq!(&memory[16..18], b"hi");
        assert!(memory[..16].iter().chain(&memory[18..]).all(|&b| b == 0));
    }

    /// A module with one function `(i32) -> i32`, exported as `f` and named `name` in the
    /// `name` section.
    fn one_function_module(name: &str) -> Vec<u8> {
        let mut names = vec![1, 0, name.len() as u8];
        names.extend_from_slice(name.as_bytes());
        let mut custom = vec![4, b'n', b'a', b'm', b'e', 1, names.len() as u8];
        custom.extend_from_slice(&names);
        [
            &HEADER[..],
            &[1, 6, 1, 0x60, 1, 0x7f, 1, 0x7f],
            &[3, 2, 1, 0],
            &[7, 5, 1, 1, b'f', 0, 0],
            &[10, 6, 1, 4, 0, 0x20, 0, 0x0b],
            &[0, custom.len() as u8],
            &custom,
        ]
        .concat()
    }

    #[test]
    fn the_interrupt_function_is_exported_by_its_name_section_name() {
        let module = one_function_module(INTERRUPT_FUNCTION);
        let exported = with_interrupt_export(&module).unwrap().expect("the function is found");
        wasmparser::Validator::new()
            .validate_all(&exported)
            .expect("still a valid module");
        let mut exports = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(&exported) {
            if let wasmparser::Payload::ExportSection(reader) = payload.unwrap() {
                for export in reader {
                    let export = export.unwrap();
                    exports.push((export.name.to_owned(), export.index));
                }
            }
        }
        assert_eq!(exports, [("f".to_owned(), 0), (INTERRUPT_EXPORT.to_owned(), 0)]);
        assert!(
            with_interrupt_export(&one_function_module("something_else"))
                .unwrap()
                .is_none(),
            "no such function: nothing to export"
        );
    }

    #[test]
    fn a_segment_past_the_initial_memory_is_refused() {
        // "hi" at 65535: one byte past the single page.
        let module = [
            &HEADER[..],
            &MEMORY,
            &[11, 10, 1, 0, 0x41, 0xff, 0xff, 0x03, 0x0b, 2, b'h', b'i'],
        ]
        .concat();
        assert!(matches!(split_data(&module), Err(SplitError::Shape(_))));
    }
}

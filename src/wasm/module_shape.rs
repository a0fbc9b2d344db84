//! Whether the runtime module can be restored from a memory snapshot, read from the wasm
//! binary with `wasmparser`.
//!
//! A snapshot carries linear memory only. Everything else an instance holds must therefore be
//! the same in every instance between turns, and this module checks the parts the binary can
//! show:
//! - one memory, defined by the module (not imported, not shared), which the snapshot covers;
//! - no imported global, memory or table, whose state would live outside the instance;
//! - every mutable global is the C stack pointer (`__stack_pointer` in the name section),
//!   which is back at its initial value whenever no turn is running; the interpreter checks
//!   that value at run time with a stack probe (see `snapshot.rs`);
//! - no exported table, so the host cannot change a table either. That the guest's code never
//!   writes a table (no `table.set`, `table.grow`, ...) is a property of the pinned runtime,
//!   checked over its whole code section by this module's tests: scanning 74 MB of code takes
//!   most of a second, too long for every backend start.
//!
//! Only the small sections are read: the code and data sections and all of the `name` section
//! but its global names (nearly all of the runtime's 100 MB) are skipped with seeks.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use wasmparser::{
    BinaryReader, ExportSectionReader, ExternalKind, GlobalSectionReader, ImportSectionReader, MemorySectionReader,
    NameMap, TypeRef, ValType,
};

/// The name LLVM gives the C stack pointer, the one global a snapshot may leave mutable.
const STACK_POINTER: &str = "__stack_pointer";
const WASM_MAGIC: [u8; 4] = *b"\0asm";
const WASM_VERSION: [u8; 4] = [1, 0, 0, 0];
const SECTION_CUSTOM: u8 = 0;
const SECTION_IMPORT: u8 = 2;
const SECTION_MEMORY: u8 = 5;
const SECTION_GLOBAL: u8 = 6;
const SECTION_EXPORT: u8 = 7;
/// The custom section with the names of functions, globals, ...
const NAME_SECTION: &str = "name";
/// The `name` section's subsection of global names.
const GLOBAL_NAMES: u8 = 7;

/// Why a module cannot be restored from a memory snapshot.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UnsnapshotableModule {
    /// The module file could not be read.
    #[error("failed to read the runtime module {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The module is not a wasm binary wasmparser can read.
    #[error("failed to parse the runtime module's {section} section")]
    Parse {
        /// Which section.
        section: &'static str,
        /// Why.
        #[source]
        source: wasmparser::BinaryReaderError,
    },
    /// The file does not start with a core wasm module header.
    #[error("the runtime module is not a core wasm module (bad header)")]
    NotAModule,
    /// Imported state lives outside the instance, where a snapshot cannot reach it.
    #[error("the runtime imports a {kind} (`{module}::{name}`), which a memory snapshot does not cover")]
    ImportedState {
        /// `global`, `memory` or `table`.
        kind: &'static str,
        /// The import's module.
        module: String,
        /// The import's name.
        name: String,
    },
    /// A snapshot covers exactly one memory.
    #[error(
        "the runtime defines {count} memories (or a shared or 64-bit one); a snapshot covers exactly one plain memory"
    )]
    Memories {
        /// How many it defines.
        count: usize,
    },
    /// A mutable global other than the stack pointer could hold state the snapshot misses.
    #[error(
        "the runtime's global {index} ({name}) is mutable and not the stack pointer, so a memory snapshot would miss its value"
    )]
    MutableGlobal {
        /// The global's index.
        index: u32,
        /// Its name from the name section, or `unnamed`.
        name: String,
    },
    /// The host could change an exported table, which a snapshot does not carry.
    #[error("the runtime exports a table (`{0}`), which a memory snapshot does not carry")]
    ExportedTable(String),
}

/// The sections the checks read, with their offsets in the file (for wasmparser's errors).
#[derive(Default)]
struct ShapeSections {
    imports: Option<(usize, Vec<u8>)>,
    memories: Option<(usize, Vec<u8>)>,
    globals: Option<(usize, Vec<u8>)>,
    exports: Option<(usize, Vec<u8>)>,
    /// The `name` section's global names subsection.
    global_names: Option<(usize, Vec<u8>)>,
}

/// Checks that the module at `path` can be restored from a memory snapshot (see the module
/// documentation for what that takes).
pub(crate) fn check_snapshot_support(path: &Path) -> Result<(), UnsnapshotableModule> {
    let read_error = |source| UnsnapshotableModule::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let sections = read_shape_sections(&mut BufReader::new(file))
        .map_err(read_error)?
        .ok_or(UnsnapshotableModule::NotAModule)?;
    check_sections(&sections)
}

fn check_sections(sections: &ShapeSections) -> Result<(), UnsnapshotableModule> {
    if let Some((offset, bytes)) = &sections.imports {
        check_imports(BinaryReader::new(bytes, *offset))?;
    }
    let memories = match &sections.memories {
        Some((offset, bytes)) => count_plain_memories(BinaryReader::new(bytes, *offset))?,
        None => (0, 0),
    };
    if memories != (1, 1) {
        return Err(UnsnapshotableModule::Memories { count: memories.0 });
    }
    if let Some((offset, bytes)) = &sections.exports {
        check_exports(BinaryReader::new(bytes, *offset))?;
    }
    if let Some((offset, bytes)) = &sections.globals {
        let mutable = mutable_globals(BinaryReader::new(bytes, *offset))?;
        if !mutable.is_empty() {
            let names = match &sections.global_names {
                Some((offset, bytes)) => global_names(BinaryReader::new(bytes, *offset))?,
                None => Vec::new(),
            };
            check_mutable_globals(&mutable, &names)?;
        }
    }
    Ok(())
}

/// Reads the header and the sections the checks need, seeking past the rest. `None` when the
/// header is not a core wasm module's.
fn read_shape_sections(file: &mut BufReader<File>) -> std::io::Result<Option<ShapeSections>> {
    let mut header = [0u8; 8];
    file.read_exact(&mut header)?;
    if header[..4] != WASM_MAGIC || header[4..] != WASM_VERSION {
        return Ok(None);
    }
    let mut sections = ShapeSections::default();
    let mut offset = header.len();
    while let Some((id, size, header_len)) = read_entry_header(file)? {
        let start = offset + header_len;
        let wanted = match id {
            SECTION_IMPORT => Some(&mut sections.imports),
            SECTION_MEMORY => Some(&mut sections.memories),
            SECTION_GLOBAL => Some(&mut sections.globals),
            SECTION_EXPORT => Some(&mut sections.exports),
            _ => None,
        };
        match wanted {
            Some(slot) => *slot = Some((start, read_bytes(file, size)?)),
            None if id == SECTION_CUSTOM => {
                if let Some(names) = read_global_names(file, start, size)? {
                    sections.global_names = Some(names);
                }
            }
            None => file.seek_relative(size as i64)?,
        }
        offset = start + size;
    }
    Ok(Some(sections))
}

/// Reads a custom section at `start` of `size` bytes (the reader just past its header) up to
/// its end: the global names subsection if this is the `name` section, seeking past the rest.
fn read_global_names(
    file: &mut BufReader<File>,
    start: usize,
    size: usize,
) -> std::io::Result<Option<(usize, Vec<u8>)>> {
    let (name_len, leb_len) = read_leb(file)?;
    let mut rest = size.checked_sub(leb_len + name_len).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a custom section's name is longer than the section",
        )
    })?;
    if read_bytes(file, name_len)? != NAME_SECTION.as_bytes() {
        file.seek_relative(rest as i64)?;
        return Ok(None);
    }
    let mut offset = start + leb_len + name_len;
    let mut found = None;
    while rest > 0 {
        let Some((id, len, header_len)) = read_entry_header(file)? else {
            break;
        };
        offset += header_len;
        if id == GLOBAL_NAMES {
            found = Some((offset, read_bytes(file, len)?));
        } else {
            file.seek_relative(len as i64)?;
        }
        offset += len;
        rest = rest.saturating_sub(header_len + len);
    }
    Ok(found)
}

fn read_bytes(file: &mut impl Read, len: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// A section's (or a `name` subsection's) id and payload size, and how many bytes the two
/// took; `None` at the end of the file.
fn read_entry_header(file: &mut impl Read) -> std::io::Result<Option<(u8, usize, usize)>> {
    let mut id = [0u8; 1];
    if file.read(&mut id)? == 0 {
        return Ok(None);
    }
    let (size, len) = read_leb(file)?;
    Ok(Some((id[0], size, len + 1)))
}

/// An unsigned LEB128 u32, and how many bytes it took.
fn read_leb(file: &mut impl Read) -> std::io::Result<(usize, usize)> {
    let (mut value, mut shift, mut len) = (0usize, 0u32, 0usize);
    loop {
        let mut byte = [0u8; 1];
        file.read_exact(&mut byte)?;
        len += 1;
        value |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            return Ok((value, len));
        }
        if shift > 28 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a size in the module is not a valid u32 LEB128",
            ));
        }
    }
}

fn parse_error(section: &'static str) -> impl Fn(wasmparser::BinaryReaderError) -> UnsnapshotableModule {
    move |source| UnsnapshotableModule::Parse { section, source }
}

fn check_imports(reader: BinaryReader<'_>) -> Result<(), UnsnapshotableModule> {
    let error = parse_error("import");
    for import in ImportSectionReader::new(reader).map_err(&error)?.into_imports() {
        let import = import.map_err(&error)?;
        let kind = match import.ty {
            TypeRef::Global(_) => "global",
            TypeRef::Memory(_) => "memory",
            TypeRef::Table(_) => "table",
            _ => continue,
        };
        return Err(UnsnapshotableModule::ImportedState {
            kind,
            module: import.module.into(),
            name: import.name.into(),
        });
    }
    Ok(())
}

/// How many memories the module defines, and how many of them are plain (32-bit, unshared).
fn count_plain_memories(reader: BinaryReader<'_>) -> Result<(usize, usize), UnsnapshotableModule> {
    let error = parse_error("memory");
    let (mut all, mut plain) = (0, 0);
    for memory in MemorySectionReader::new(reader).map_err(&error)? {
        let memory = memory.map_err(&error)?;
        all += 1;
        plain += usize::from(!memory.memory64 && !memory.shared);
    }
    Ok((all, plain))
}

fn check_exports(reader: BinaryReader<'_>) -> Result<(), UnsnapshotableModule> {
    let error = parse_error("export");
    for export in ExportSectionReader::new(reader).map_err(&error)? {
        let export = export.map_err(&error)?;
        if export.kind == ExternalKind::Table {
            return Err(UnsnapshotableModule::ExportedTable(export.name.into()));
        }
    }
    Ok(())
}

/// The indices and types of the module's mutable globals (it imports none; checked first).
fn mutable_globals(reader: BinaryReader<'_>) -> Result<Vec<(u32, ValType)>, UnsnapshotableModule> {
    let error = parse_error("global");
    let mut mutable = Vec::new();
    for (index, global) in GlobalSectionReader::new(reader)
        .map_err(&error)?
        .into_iter()
        .enumerate()
    {
        let global = global.map_err(&error)?;
        if global.ty.mutable {
            mutable.push((index as u32, global.ty.content_type));
        }
    }
    Ok(mutable)
}

/// The global names from the `name` section's subsection, by index.
fn global_names(reader: BinaryReader<'_>) -> Result<Vec<(u32, String)>, UnsnapshotableModule> {
    let error = parse_error("name");
    let mut names = Vec::new();
    for naming in NameMap::new(reader).map_err(&error)? {
        let naming = naming.map_err(&error)?;
        names.push((naming.index, naming.name.to_string()));
    }
    Ok(names)
}

fn check_mutable_globals(mutable: &[(u32, ValType)], names: &[(u32, String)]) -> Result<(), UnsnapshotableModule> {
    for (index, ty) in mutable {
        let name = names.iter().find(|(i, _)| i == index).map(|(_, n)| n.as_str());
        if name != Some(STACK_POINTER) || *ty != ValType::I32 {
            return Err(UnsnapshotableModule::MutableGlobal {
                index: *index,
                name: name.unwrap_or("unnamed").to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section: its id, its LEB128 size, its payload.
    fn section(id: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![id];
        bytes.extend(leb(payload.len()));
        bytes.extend_from_slice(payload);
        bytes
    }

    fn leb(mut value: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                bytes.push(byte);
                return bytes;
            }
            bytes.push(byte | 0x80);
        }
    }

    fn name(text: &str) -> Vec<u8> {
        [leb(text.len()), text.as_bytes().to_vec()].concat()
    }

    /// A module with one memory and the given i32 globals (`(mutable, name)`), named in a
    /// `name` section, written to a file in a fresh temp dir.
    fn module_with_globals(globals: &[(bool, Option<&str>)]) -> (tempfile::TempDir, PathBuf) {
        let mut wasm = [WASM_MAGIC, WASM_VERSION].concat();
        wasm.extend(section(SECTION_MEMORY, &[1, 0x00, 1]));
        let mut payload = leb(globals.len());
        for (mutable, _) in globals {
            // i32, mutability, `i32.const 0`, `end`
            payload.extend([0x7f, u8::from(*mutable), 0x41, 0, 0x0b]);
        }
        wasm.extend(section(SECTION_GLOBAL, &payload));
        let named: Vec<(usize, &str)> = globals
            .iter()
            .enumerate()
            .filter_map(|(i, (_, n))| n.map(|n| (i, n)))
            .collect();
        let mut map = leb(named.len());
        for (index, text) in named {
            map.extend(leb(index));
            map.extend(name(text));
        }
        let subsection = [vec![7u8], leb(map.len()), map].concat();
        wasm.extend(section(SECTION_CUSTOM, &[name(NAME_SECTION), subsection].concat()));
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("module.wasm");
        std::fs::write(&path, wasm).expect("write the module");
        (dir, path)
    }

    #[test]
    fn a_stack_pointer_and_constants_are_fine() {
        let (_dir, path) = module_with_globals(&[
            (true, Some(STACK_POINTER)),
            (false, Some("__memory_base")),
            (false, None),
        ]);
        check_snapshot_support(&path).expect("only the stack pointer is mutable");
    }

    #[test]
    fn another_mutable_global_is_refused_by_name() {
        let (_dir, path) = module_with_globals(&[(true, Some(STACK_POINTER)), (true, Some("counter"))]);
        let error = check_snapshot_support(&path).unwrap_err();
        assert!(
            matches!(&error, UnsnapshotableModule::MutableGlobal { index: 1, name } if name == "counter"),
            "{error}"
        );
    }

    #[test]
    fn an_unnamed_mutable_global_is_refused() {
        let (_dir, path) = module_with_globals(&[(true, None)]);
        let error = check_snapshot_support(&path).unwrap_err();
        assert!(error.to_string().contains("unnamed"), "{error}");
    }

    #[test]
    fn a_file_that_is_not_wasm_is_refused() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("not.wasm");
        std::fs::write(&path, b"#!/bin/sh\necho hi\n").expect("write");
        assert!(matches!(
            check_snapshot_support(&path),
            Err(UnsnapshotableModule::NotAModule)
        ));
    }

    /// The pinned runtime passes the checks, and its code never writes a table: the half of
    /// "tables are unchanged" that is too slow to check at every backend start.
    #[test]
    fn the_pinned_runtime_supports_snapshots_and_never_writes_a_table() {
        let options = crate::wasm::runtime::RuntimeOptions::from_env();
        let runtime = crate::wasm::runtime::install::ensure_installed(&options, &crate::SilentReporter)
            .expect("the runtime installs");
        check_snapshot_support(&runtime.snapshot).expect("the pinned runtime supports snapshots");
        let wasm = std::fs::read(&runtime.snapshot).expect("read the runtime");
        assert_eq!(table_writes(&wasm).expect("the code section parses"), 0);
    }

    /// How many instructions in the module's code could change a table.
    fn table_writes(wasm: &[u8]) -> wasmparser::Result<usize> {
        use wasmparser::{Operator, Parser, Payload};
        let mut writes = 0;
        for payload in Parser::new(0).parse_all(wasm) {
            let Payload::CodeSectionEntry(body) = payload? else {
                continue;
            };
            let mut operators = body.get_operators_reader()?;
            while !operators.eof() {
                let is_write = matches!(
                    operators.read()?,
                    Operator::TableSet { .. }
                        | Operator::TableGrow { .. }
                        | Operator::TableFill { .. }
                        | Operator::TableCopy { .. }
                        | Operator::TableInit { .. }
                );
                writes += usize::from(is_write);
            }
        }
        Ok(writes)
    }
}

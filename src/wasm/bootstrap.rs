//! The Python the host sends a new interpreter: the bootstrap chunk that loads the guest module,
//! the preload cell, and the environment the guest sees.

use crate::slot::workspace::GUEST_WORKSPACE;

/// Where the guest module claims to live, for tracebacks.
const GUEST_MODULE_PATH: &str = "/rollbox/rollbox_guest.py";

/// The folders every store preopens, as descriptors 3 and up in this order: the stdlib,
/// matplotlib's data, the workspace, `/tmp`.
pub(crate) const PREOPENS: u32 = 4;

/// Where the slot's private temporary folder is preopened; also the guest's `HOME`.
pub(crate) const GUEST_TMP: &str = "/tmp";

/// Every environment variable the guest sees: no host variable reaches it.
pub(crate) const GUEST_ENV: [(&str, &str); 5] = [
    ("HOME", "/tmp"),
    ("TMPDIR", "/tmp"),
    ("MPLCONFIGDIR", "/tmp/.matplotlib"),
    ("MPLBACKEND", "agg"),
    ("PYTHONIOENCODING", "utf-8"),
];

/// The guest's answer to the bootstrap: loaded, and its turn handler installed.
pub(crate) const GUEST_READY: &[u8] = br#"{"ready": true, "hooked": true}"#;

/// The chunk that loads `guest/rollbox_guest.py` as the module `rollbox_guest`, moves into the
/// workspace, installs the guest's turn handler and answers the readiness check, leaving
/// `__main__`'s namespace as it was. The module arrives through the door as source (`S`) the
/// first time, and the guest uploads its compiled code (`M` + marshal) for the factory to
/// hand every later interpreter, so only one interpreter per backend pays for the compile.
pub(crate) fn bootstrap_chunk(output_bytes: usize) -> String {
    format!(
        "import sys as _rb_sys, types as _rb_types, os as _rb_os, _host as _rb_host, marshal as _rb_marshal\n\
         _rb_m = _rb_types.ModuleType('rollbox_guest')\n\
         _rb_m.__file__ = '{GUEST_MODULE_PATH}'\n\
         _rb_sys.modules['rollbox_guest'] = _rb_m\n\
         _rb_d = _rb_host.call(b'pull')\n\
         if _rb_d[1:2] == b'M':\n    _rb_c = _rb_marshal.loads(_rb_d[2:])\n\
         else:\n    _rb_c = compile(_rb_d[2:].decode('utf-8'), _rb_m.__file__, 'exec')\n    _rb_host.call(b'M' + _rb_marshal.dumps(_rb_c))\n\
         exec(_rb_c, _rb_m.__dict__)\n\
         _rb_os.chdir('{GUEST_WORKSPACE}')\n\
         del _rb_sys, _rb_types, _rb_os, _rb_host, _rb_marshal, _rb_m, _rb_d, _rb_c\n\
         __import__('rollbox_guest').start({output_bytes}, True)\n"
    )
}

/// The cell that imports `modules` in a new interpreter (see `_preload` in the guest).
pub(crate) fn preload_cell(modules: &[String]) -> String {
    // A JSON list of strings is a Python list literal.
    format!(
        "__import__('rollbox_guest')._preload({})",
        serde_json::Value::from(modules.to_vec())
    )
}

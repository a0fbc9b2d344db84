//! Entries for the fuzz targets in `fuzz/` (cargo-fuzz, not a workspace member): the few
//! parsers of hostile input whose real code is private to the crate. Each runs the same code
//! the backend or server runs on the same bytes. Not an API: hidden from the docs, and free
//! to change with the targets.

use crate::slot::cell::{GuestReport, Streams};
use crate::slot::outputs::{Run, StreamLog, StreamName};
use crate::slot::{CellOutput, Limits};

/// A guest's cell report, as bytes the guest controls, decoded and turned into the cell the
/// host reports, as the wasm backend does (the streams are the host's `stdout` and `stderr`,
/// one run each) and as the process backend does (the report carries the streams, the host
/// adds the stray `stdout`/`stderr` it captured). `None` when the bytes are not a report,
/// which the backends answer with `guest_crashed`. Each pair is the cell and whether
/// anything was cut.
pub fn guest_report(report: &[u8], stdout: &[u8], stderr: &[u8], limits: &Limits) -> Option<[(CellOutput, bool); 2]> {
    let parse = || serde_json::from_slice::<GuestReport>(report).ok();
    let (captured, reported) = (parse()?, parse()?);
    let mut runs = Vec::new();
    for (stream, bytes) in [(StreamName::Stdout, stdout), (StreamName::Stderr, stderr)] {
        if !bytes.is_empty() {
            runs.push(Run {
                stream,
                end: bytes.len(),
            });
        }
    }
    let log = StreamLog {
        kept: [stdout.to_vec(), stderr.to_vec()],
        dropped: [0, 0],
        runs,
    };
    let stray = Streams::Reported {
        fd_stdout: String::from_utf8_lossy(stdout).into_owned(),
        fd_stderr: String::from_utf8_lossy(stderr).into_owned(),
    };
    Some([
        captured.into_cell(Streams::HostCaptured(log), limits),
        reported.into_cell(stray, limits),
    ])
}

/// `/run_code`'s checks of a request body (JSON, then language, paths and base64): `None`
/// when the body is not a request (the server answers 400), else the plan's result (`Err` is
/// the `SandboxError` message the server answers).
pub fn run_code_request(body: &[u8]) -> Option<Result<(), String>> {
    let request = serde_json::from_slice::<crate::server::run_code::RunCodeRequest>(body).ok()?;
    Some(crate::server::run_code::RunPlan::new(request, &crate::slot::ToolName::ALL).map(|_| ()))
}

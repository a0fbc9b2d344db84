//! The guest's cell report, as a hostile cell can forge it: decoded and turned into the cell
//! the host reports, both as the wasm backend does (host-captured streams) and as the process
//! backend does (streams in the report). Checks, besides no panic: every text the host
//! reports from the report is under the host's cap, whatever the report claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollbox::Limits;

/// Room for the marker the host appends to a cut text ("[rollbox: output truncated, …]").
const MARKER_ROOM: usize = 256;

fuzz_target!(|data: &[u8]| {
    let [cap, rest @ ..] = data else {
        return;
    };
    let cap = usize::from(*cap) * 16 + 1;
    // "report\0stdout\0stderr": the host's own capture is already under the cap.
    let mut parts = rest.splitn(3, |b| *b == 0);
    let report = parts.next().unwrap_or_default();
    let stdout = &parts.next().unwrap_or_default()[..];
    let stderr = &parts.next().unwrap_or_default()[..];
    let limits = Limits {
        output_bytes: cap,
        ..Limits::default()
    };
    let (stdout, stderr) = (&stdout[..stdout.len().min(cap)], &stderr[..stderr.len().min(cap)]);
    let Some(cells) = rollbox::fuzzing::guest_report(report, stdout, stderr, &limits) else {
        return;
    };
    for (cell, _) in cells {
        let bound = cap + MARKER_ROOM;
        if let Some(error) = &cell.error {
            assert!(error.value.len() <= bound, "an exception value of {}", error.value.len());
        }
        for bundle in cell.result.iter().chain(&cell.display) {
            if let Some(plain) = bundle.get("text/plain") {
                assert!(plain.len() <= bound, "a text/plain of {}", plain.len());
            }
        }
    }
});

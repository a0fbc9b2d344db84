//! The server's request decoding: the bodies of `/v1/slots`, `/v1/execute`, release and
//! `/run_code` as a client sends them, each call's tool arguments as the backends parse them,
//! and `/run_code`'s own checks (language, paths, base64). Checks no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollbox::server::api::{AcquireRequest, ExecuteRequest, ReleaseRequest};
use rollbox::slot::tools::ToolRequest;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<AcquireRequest>(data);
    let _ = serde_json::from_slice::<ReleaseRequest>(data);
    if let Ok(request) = serde_json::from_slice::<ExecuteRequest>(data) {
        for call in &request.calls {
            let _ = ToolRequest::parse(&call.call.name, &call.call.arguments);
        }
    }
    let _ = rollbox::fuzzing::run_code_request(data);
});

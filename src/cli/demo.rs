//! `rollbox demo`: a short tour of a slot: state across cells, numpy, the limits, timings.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use rollbox::{Backend, ExecutionResult, Limits, ToolCall};

use super::{Printer, RuntimeArgs, start_wasm_backend};

#[derive(Args)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub(crate) async fn run(args: DemoArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let limits = Limits {
        memory_bytes: 512 << 20,
        output_bytes: 4096,
        ..Limits::default()
    };
    let backend = start_wasm_backend(limits, &args.runtime, printer).await?;
    println!(
        "backend ready in {:.1} ms (runtime cached and compiled)",
        ms(started.elapsed())
    );
    let acquired = Instant::now();
    let slot = backend.acquire("demo").await?;
    println!(
        "slot acquired in {:.2} ms: a fresh CPython 3.15 interpreter",
        ms(acquired.elapsed())
    );

    let steps: [(&str, &str, Option<Duration>); 8] = [
        ("state persists", "x = 41", None),
        ("state persists", "x += 1\nx", None),
        (
            "numpy",
            "import numpy as np\nnp.linalg.eigvalsh(np.diag([3.0, 1.0, 2.0])).tolist()",
            None,
        ),
        ("an exception is data", "1 / 0", None),
        (
            "time limit (0.5 s)",
            "while True:\n    pass",
            Some(Duration::from_millis(500)),
        ),
        ("fresh interpreter after the restart", "'x' in globals()", None),
        ("memory limit (512 MiB)", "block = bytearray(2_000_000_000)", None),
        ("output limit (4096 bytes)", "print('y' * 100_000)", None),
    ];
    let mut failed_unexpectedly = false;
    for (what, code, timeout) in steps {
        let mut call = ToolCall::python(code);
        call.timeout = timeout;
        let result = backend.execute(&slot, call).await;
        println!("\n## {what}\n>>> {}", code.replace('\n', "\n... "));
        println!("{}", summarise(&result));
        failed_unexpectedly |= what.starts_with("state") && !result.success;
    }

    let mut durations = Vec::with_capacity(200);
    backend.execute(&slot, ToolCall::python("x = 0")).await;
    for _ in 0..200 {
        let result = backend.execute(&slot, ToolCall::python("x += 1")).await;
        durations.push(result.metadata.duration_us);
    }
    durations.sort_unstable();
    println!(
        "\n## timing\n200 cells of `x += 1`: median {} µs, p90 {} µs (in-slot time)",
        durations[100], durations[180]
    );
    backend.release(&slot, true).await?;
    println!("total {:.0} ms", ms(started.elapsed()));
    Ok(if failed_unexpectedly {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn summarise(result: &ExecutionResult) -> String {
    let mut text = result.output.trim_end().to_string();
    if text.len() > 300 {
        // Head and tail, so a truncation marker at the end stays visible.
        let (mut head, mut tail) = (120, text.len() - 160);
        while !text.is_char_boundary(head) {
            head -= 1;
        }
        while !text.is_char_boundary(tail) {
            tail += 1;
        }
        text = format!(
            "{} … {} ({} bytes in all)",
            &text[..head],
            text[tail..].trim_start(),
            result.output.len()
        );
    }
    let mut facts = vec![
        format!("success={}", result.success),
        format!("{} µs", result.metadata.duration_us),
    ];
    if let Some(limit) = result.metadata.limit_hit {
        facts.push(format!("limit_hit={limit}"));
    }
    if result.metadata.state_lost {
        facts.push("state_lost".into());
    }
    if result.metadata.interrupted {
        facts.push("interrupted".into());
    }
    if result.metadata.rolled_back {
        facts.push("rolled_back".into());
    }
    if let Some(error) = &result.error {
        facts.push(format!("error={:?}", error.kind));
    }
    format!("{text}\n[{}]", facts.join(", "))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

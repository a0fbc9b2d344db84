//! The guest decides from a cell's text alone whether its last statement can have a value, and
//! then compiles it once instead of parsing it (`_ends_in_plain_statement` in
//! `guest/rollbox_guest.py`). A cell holding a carriage return always takes the exact parsing
//! path, and Python reads `\r\n` as `\n`. So each generated cell runs twice, over the real
//! runtime: as written in one slot, and with `\r\n` line ends in another. Both slots must give
//! the same success, value, output and error for every cell.

use rollbox::{Backend, ExecutionResult, Slot, ToolCall};

use crate::support::{pretty, shared_wasm};

/// Cells generated per run.
const CELLS: usize = 4_000;

/// Statements that may come before a cell's last line: assignments, compound statements, and
/// lines whose strings, comments, brackets or continuations could fool a text check.
const OPENINGS: &[&str] = &[
    "x = 1",
    "y = [1,\n 2]",
    "s = 'a = b'",
    "t = \"#\" + 'x'",
    "# a comment = 3",
    "z = (1 +\n     2)",
    "w = 1 \\\n    + 2",
    "def f(a=1):\n    return a",
    "class C:\n    v = 2",
    "if x:\n    q = 1\nelse:\n    q = 2",
    "for i in range(2):\n    pass",
    "import math",
    "import asyncio",
    "a: int = 5",
    "x += 1",
    "print('p =', x)",
    "d = {'k': 1}",
    "g = lambda v=2: v",
    "x; y",
    "x = 1; x",
    "'''doc\nx = 1'''",
    "try:\n    1/0\nexcept ZeroDivisionError:\n    e = 1",
    "@staticmethod\ndef h():\n    pass",
];

/// Last lines: expressions that look like statements, statements that look like expressions.
const ENDINGS: &[&str] = &[
    "x",
    "x == 1",
    "x = 2",
    "x = y = 3",
    "f(a=1)",
    "(y := 4)",
    "x != 2",
    "x <= 3",
    "x >= 3",
    "x; z = 1",
    "z = 1; x",
    "s = 'a'; s",
    "print(x)",
    "x  # = 1",
    "lambda a=1: a",
    "d['k'] = 5",
    "d['k']",
    "x if x else 0",
    "not x",
    "await asyncio.sleep(0, 'v')",
    "r = await asyncio.sleep(0, 7)",
    "del x",
    "raise ValueError('v = 1')",
    "assert x",
    "pass",
    "[i for i in range(3)]",
    "else_ = 1",
    "import_x = 2",
    "x, y2 = 1, 2",
    "f'{x=}'",
    "x[0] = 1",
    "x.attr = 1",
    "x = (1,\n     2)",
    "if x: x",
    "with open('w.txt', 'w') as out: out.write('=')",
    "def k(): return 1",
    "class D: pass",
    "x +",
];

/// What may follow the last line.
const TAILS: &[&str] = &["", "\n", "\n\n", "\n# done", "\n   ", "\n\t"];

/// A small deterministic generator (64-bit LCG), so a failure names a cell that reruns.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

fn generated_cells() -> Vec<String> {
    let mut rng = Lcg(18);
    (0..CELLS)
        .map(|_| {
            let mut lines: Vec<&str> = (0..rng.below(4)).map(|_| rng.pick(OPENINGS)).collect();
            lines.push(rng.pick(ENDINGS));
            format!("{}{}", lines.join("\n"), rng.pick(TAILS))
        })
        .collect()
}

/// The parts of a result both paths must agree on.
fn outcome(result: &ExecutionResult) -> String {
    let cell = result.cell.clone().unwrap_or_default();
    let value = cell.result.and_then(|r| r.get("text/plain").cloned());
    let error = cell.error.map(|e| (e.name, e.value));
    let text = format!(
        "success {} state_lost {} value {value:?} stdout {:?} stderr {:?} error {error:?}",
        result.success, result.metadata.state_lost, cell.stdout, cell.stderr
    );
    // Objects without a repr of their own show their address, which differs between slots.
    let address = regex::Regex::new("0x[0-9a-f]+").expect("regex");
    address.replace_all(&text, "0x…").into_owned()
}

/// How many of `cells` the guest would compile straight from their text, asked of the guest.
async fn fast_path_count(backend: &dyn Backend, slot: &Slot, cells: &[String]) -> usize {
    let list = serde_json::to_string(cells).expect("JSON");
    let code =
        format!("import json, rollbox_guest\nsum(map(rollbox_guest._ends_in_plain_statement, json.loads({list:?})))");
    let counted = backend.execute(slot, ToolCall::python(code)).await;
    let value = counted
        .cell
        .as_ref()
        .and_then(|c| c.result.as_ref())
        .and_then(|r| r.get("text/plain"))
        .unwrap_or_else(|| panic!("no count:\n{}", pretty(&counted)));
    value.parse().expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_check_and_the_parsing_path_agree_on_generated_cells() {
    let backend = shared_wasm();
    let cells = generated_cells();
    let judge = backend.acquire("paths-judge").await.expect("acquire");
    let fast = fast_path_count(backend, &judge, &cells).await;
    backend.release(&judge, true).await.expect("release");
    eprintln!("{fast} of {CELLS} generated cells take the text-decided path");
    // Both paths must be exercised for the comparison to mean anything.
    assert!(
        (CELLS / 5..=CELLS * 4 / 5).contains(&fast),
        "{fast} of {CELLS} cells take the text-decided path"
    );
    let as_written = backend.acquire("paths-as-written").await.expect("acquire");
    let parsed = backend.acquire("paths-parsed").await.expect("acquire");
    for (i, cell) in cells.iter().enumerate() {
        let text_path = backend.execute(&as_written, ToolCall::python(cell.clone())).await;
        let parse_path = backend
            .execute(&parsed, ToolCall::python(cell.replace('\n', "\r\n")))
            .await;
        assert_eq!(
            outcome(&text_path),
            outcome(&parse_path),
            "cell {i} gives different results on the two paths:\n{cell}"
        );
    }
    backend.release(&as_written, true).await.expect("release");
    backend.release(&parsed, true).await.expect("release");
}

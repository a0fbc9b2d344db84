//! Scoring a 1 MB reply of each hostile shape on the host: the code blocks, the final answer,
//! its limits, the exact-number parser and the translation to sympy (everything before sympy
//! runs in the slot). Issue 20's target is at most 50 ms per reply. Run with
//! `cargo bench --bench hostile`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rollbox::rollout::answer::{
    MAX_ANSWER_BYTES, check_answer_limits, extract_final_answer, latex_to_sympy, parse_exact_number,
};
use rollbox::rollout::code_blocks::{CodeTags, extract_code_blocks};

const MEGABYTE: usize = 1 << 20;

/// What the host does with a notebook reply before sympy: the blocks found, and the length of
/// the sympy form of its answer when the answer is within the limits.
fn score(text: &str, tags: &CodeTags) -> (usize, usize) {
    let blocks = extract_code_blocks(text, tags).len();
    let translated = extract_final_answer(text)
        .filter(|answer| check_answer_limits(answer).is_ok())
        .map_or(0, |answer| {
            let _ = parse_exact_number(&answer);
            latex_to_sympy(&answer).map_or(0, |sympy| sympy.len())
        });
    (blocks, translated)
}

/// The shapes of issue 20 and their relatives, each about 1 MB.
fn replies() -> Vec<(&'static str, String)> {
    let repeated = |unit: &str| unit.repeat(MEGABYTE / unit.len());
    let nested_frac = |depth: usize| format!("{}2{}", "\\frac{1}{".repeat(depth), "}".repeat(depth));
    let deepest_allowed = {
        let body = "2+".repeat((MAX_ANSWER_BYTES - 400) / 2);
        format!("{}{body}{}", "\\sqrt{".repeat(31), "}".repeat(31))
    };
    vec![
        ("boxed_open_repeated", repeated("\\boxed{")),
        ("code_tags_repeated", repeated("<code> </code>")),
        ("python_fences", repeated("```python\nx = 1\n```\n")),
        ("code_open_unclosed", repeated("<code>")),
        ("fences_on_one_line", repeated("```python ")),
        ("open_braces", repeated("{")),
        ("plain_prose", repeated("The answer follows from the lemma. ")),
        ("frac_nested_100k", format!("\\boxed{{{}}}", nested_frac(100_000))),
        (
            "prose_then_answer_at_the_limits",
            format!("{}\\boxed{{{deepest_allowed}}}", "x".repeat(MEGABYTE)),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let tags = CodeTags::default();
    let mut group = c.benchmark_group("score_1mb_reply");
    group.sample_size(20);
    for (name, reply) in replies() {
        group.bench_function(name, |b| b.iter(|| score(black_box(&reply), &tags)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

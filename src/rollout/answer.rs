//! Final answers: finding one in a message (`\boxed{...}` or `<answer>...</answer>`), and
//! deciding on the host, exactly, whether two plain numbers are equal.
//!
//! What the host cannot decide (radicals, symbols) goes to sympy in the trajectory's slot; see
//! [`crate::rollout::reward`] and [`latex_to_sympy`].

use crate::rollout::scan_cost::charge;

/// The longest final answer that is scored, in bytes. Real answers are a few dozen bytes; a
/// longer one is scored 0 without being parsed, so no answer can make scoring slow.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// The deepest nesting of braces, `\frac`s and `\sqrt`s that is scored. Real answers nest a few
/// levels; a deeper one is scored 0, which bounds the translation to sympy (and sympy's own
/// recursive parser) however a reply is built.
pub const MAX_ANSWER_DEPTH: usize = 32;

/// A limit an answer (or a ground truth) passed, so that it was scored 0 without being compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnswerLimit {
    /// Longer than [`MAX_ANSWER_BYTES`].
    #[error("it is {bytes} bytes long, past the limit of {MAX_ANSWER_BYTES} bytes (MAX_ANSWER_BYTES)")]
    TooLong {
        /// Its length.
        bytes: usize,
    },
    /// Nested deeper than [`MAX_ANSWER_DEPTH`].
    #[error("it nests deeper than {MAX_ANSWER_DEPTH} levels (MAX_ANSWER_DEPTH)")]
    TooDeep,
}

impl AnswerLimit {
    /// A short, stable name for the limit, as recorded in a reward's breakdown and counted in
    /// `summary.json`'s `errors_by_kind`.
    pub fn name(self) -> &'static str {
        match self {
            AnswerLimit::TooLong { .. } => "answer_too_long",
            AnswerLimit::TooDeep => "answer_too_deep",
        }
    }
}

/// Checks `answer` against [`MAX_ANSWER_BYTES`] and, in one pass, against [`MAX_ANSWER_DEPTH`]
/// for its braces.
pub fn check_answer_limits(answer: &str) -> Result<(), AnswerLimit> {
    if answer.len() > MAX_ANSWER_BYTES {
        return Err(AnswerLimit::TooLong { bytes: answer.len() });
    }
    charge(answer.len());
    let mut depth = 0usize;
    for byte in answer.bytes() {
        match byte {
            b'{' => {
                depth += 1;
                if depth > MAX_ANSWER_DEPTH {
                    return Err(AnswerLimit::TooDeep);
                }
            }
            b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The final answer in `text`: the content of the last `\boxed{...}` (braces balanced) or the
/// last `<answer>...</answer>`, whichever comes later, trimmed.
///
/// One pass over `text` whatever its shape (a reply of `\boxed{` repeated, or nested 100,000
/// deep), with no recursion.
pub fn extract_final_answer(text: &str) -> Option<String> {
    let boxed = last_boxed(text);
    let tagged = last_answer_tag(text);
    let best = match (boxed, tagged) {
        (Some(b), Some(t)) => Some(if t.0 > b.0 { t } else { b }),
        (b, t) => b.or(t),
    };
    best.map(|(_, answer)| answer.trim().to_owned())
        .filter(|a| !a.is_empty())
}

/// Whether `text` holds a final answer.
pub fn has_final_answer(text: &str) -> bool {
    extract_final_answer(text).is_some()
}

const BOXED: &[u8] = b"\\boxed";

/// Where the last `\boxed` whose `{` is closed starts, and the text between its braces.
///
/// One pass with a brace depth counter: a `{` that follows `\boxed` (spaces between allowed)
/// pushes its depth and position, and the `}` that brings the depth back down closes it. The
/// stack holds only boxed braces, each at least 7 bytes of input apart.
fn last_boxed(text: &str) -> Option<(usize, &str)> {
    charge(text.len());
    let bytes = text.as_bytes();
    // Open `\boxed{`s: (the depth its `{` opened, where `\boxed` starts, where its content starts).
    let mut open: Vec<(usize, usize, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut pending_box = None;
    let mut found: Option<(usize, usize, usize)> = None;
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'\\' && bytes[i..].starts_with(BOXED) {
            pending_box = Some(i);
            i += BOXED.len();
            continue;
        }
        match byte {
            b'{' => {
                depth += 1;
                if let Some(at) = pending_box {
                    open.push((depth, at, i + 1));
                }
            }
            b'}' if depth > 0 => {
                if let Some(&(opened, at, start)) = open.last()
                    && opened == depth
                {
                    open.pop();
                    if found.is_none_or(|(last, _, _)| at > last) {
                        found = Some((at, start, i));
                    }
                }
                depth -= 1;
            }
            // Spaces (any Unicode whitespace) may come between `\boxed` and its brace.
            _ if byte.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            _ if pending_box.is_some() && !byte.is_ascii() => {
                // `i` is at a character boundary here: only whole characters were skipped since
                // `\boxed`; `get` keeps that from ever being a panic.
                let c = text.get(i..).and_then(|rest| rest.chars().next()).unwrap_or('x');
                if c.is_whitespace() {
                    i += c.len_utf8();
                    continue;
                }
            }
            _ => {}
        }
        pending_box = None;
        i += 1;
    }
    found.map(|(at, start, end)| (at, &text[start..end]))
}

fn last_answer_tag(text: &str) -> Option<(usize, &str)> {
    let at = text.rfind("<answer>");
    charge(text.len() - at.unwrap_or(0));
    let at = at?;
    let inner = &text[at + "<answer>".len()..];
    let end = inner.find("</answer>");
    charge(end.unwrap_or(inner.len()));
    Some((at, &inner[..end?]))
}

/// An exact rational number, reduced, with a positive denominator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rational {
    /// The numerator.
    pub numerator: i128,
    /// The denominator, always positive.
    pub denominator: i128,
}

impl Rational {
    /// `numerator / denominator` reduced, or `None` for a zero denominator or a value whose
    /// reduced form does not fit in `i128` (a model's answer can reach `i128::MIN`, whose
    /// negation overflows).
    pub fn new(numerator: i128, denominator: i128) -> Option<Rational> {
        if denominator == 0 {
            return None;
        }
        let divisor = i128::try_from(gcd(numerator.unsigned_abs(), denominator.unsigned_abs()).max(1)).ok()?;
        let (numerator, denominator) = (numerator / divisor, denominator / divisor);
        let (numerator, denominator) = if denominator < 0 {
            (numerator.checked_neg()?, denominator.checked_neg()?)
        } else {
            (numerator, denominator)
        };
        Some(Rational { numerator, denominator })
    }

    fn divide(self, other: Rational) -> Option<Rational> {
        Rational::new(
            self.numerator.checked_mul(other.denominator)?,
            self.denominator.checked_mul(other.numerator)?,
        )
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `answer` as an exact number when it is one: an integer or decimal (`-3`, `97.20`,
/// `128,000`), a fraction `a/b`, or `\frac{a}{b}` (also `\dfrac`, `\tfrac`), optionally in `$`s,
/// with a trailing `\text{...}` unit or `%`. Anything else is `None`.
pub fn parse_exact_number(answer: &str) -> Option<Rational> {
    let text = normalize(answer);
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let value = if let Some(rest) = body.strip_prefix("\\frac{") {
        let numerator_end = rest.find('}')?;
        let denominator = rest[numerator_end + 1..].strip_prefix('{')?.strip_suffix('}')?;
        parse_decimal(&rest[..numerator_end])?.divide(parse_decimal(denominator)?)?
    } else if let Some((numerator, denominator)) = body.split_once('/') {
        parse_decimal(numerator)?.divide(parse_decimal(denominator)?)?
    } else {
        parse_decimal(body)?
    };
    let numerator = if negative {
        value.numerator.checked_neg()?
    } else {
        value.numerator
    };
    Rational::new(numerator, value.denominator)
}

/// How many linear passes [`normalize`] makes at most (trims, replacements, the unit search,
/// the whitespace filter, the thousands check), for [`crate::rollout::scan_cost`].
const NORMALIZE_PASSES: usize = 16;

/// Strips what does not change a number's value: `$`, spaces, LaTeX spacing, a trailing unit in
/// `\text{}`/`\mathrm{}`, a trailing `%`, thousands separators, `\dfrac`/`\tfrac` spelling.
fn normalize(answer: &str) -> String {
    charge(NORMALIZE_PASSES * answer.len());
    let mut text: String = answer
        .trim()
        .trim_matches('$')
        .replace("\\!", "")
        .replace("\\,", "")
        .replace("\\ ", "");
    for command in ["\\text{", "\\mathrm{", "\\textrm{"] {
        if let Some(at) = text.find(command).filter(|&at| at > 0 && text.ends_with('}')) {
            text.truncate(at);
        }
    }
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    text.retain(|c| !c.is_whitespace());
    let text = text.trim_end_matches("\\%").trim_end_matches('%').to_owned();
    if is_thousands_grouped(&text) {
        text.replace(',', "")
    } else {
        text
    }
}

fn is_thousands_grouped(text: &str) -> bool {
    let integer = text.trim_start_matches('-').split('.').next().unwrap_or("");
    let groups: Vec<&str> = integer.split(',').collect();
    groups.len() > 1
        && (1..=3).contains(&groups[0].len())
        && groups
            .iter()
            .all(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
        && groups[1..].iter().all(|g| g.len() == 3)
}

/// `12`, `-0.5`, `97.20`, `.5` as an exact rational.
fn parse_decimal(text: &str) -> Option<Rational> {
    let text = text.trim();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    if !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) || fraction.len() > 30 {
        return None;
    }
    let numerator: i128 = format!("{whole}{fraction}").parse().ok()?;
    let denominator = 10i128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    Rational::new(if negative { -numerator } else { numerator }, denominator)
}

/// Rewrites a LaTeX answer as a sympy expression string: `\frac{a}{b}` -> `((a)/(b))`,
/// `\sqrt{x}` -> `sqrt(x)`, `\sqrt[n]{x}` -> `((x)**(1/(n)))`, `^` -> `**`, `\cdot`/`\times` ->
/// `*`, `\pi` -> `pi`, braces -> parentheses. Implicit products (`6sqrt(5)`) are left for
/// sympy's `implicit_multiplication_application` transformation.
///
/// An answer past [`MAX_ANSWER_BYTES`], or nested (braces, `\frac`, `\sqrt`) past
/// [`MAX_ANSWER_DEPTH`], is refused. The answer is normalised once as a whole (see
/// `normalize`), its braces are matched in one pass, and the translation then reads each byte
/// once, with an explicit stack of what is left to do instead of recursion.
pub fn latex_to_sympy(latex: &str) -> Result<String, AnswerLimit> {
    check_answer_limits(latex)?;
    let text = normalize(latex).replace("\\left", "").replace("\\right", "");
    charge(2 * text.len());
    let shape = Shape::of(&text);
    let mut out = String::with_capacity(text.len() + 16);
    let mut todo = vec![Task::Translate {
        start: 0,
        end: text.len(),
        depth: 0,
    }];
    while let Some(task) = todo.pop() {
        match task {
            Task::Emit(piece) => out.push_str(piece),
            Task::Translate { start, end, depth } => {
                if depth > MAX_ANSWER_DEPTH {
                    return Err(AnswerLimit::TooDeep);
                }
                translate_until_nested(&text, &shape, (start, end), depth, &mut out, &mut todo);
            }
        }
    }
    Ok(out)
}

/// What is left to do in [`latex_to_sympy`], last first.
enum Task {
    /// Translate `text[start..end]`, an argument `depth` levels down.
    Translate { start: usize, end: usize, depth: usize },
    /// Append this piece of output.
    Emit(&'static str),
}

/// Where each `{` of a text closes, and where the next `]` is, found in one pass each so that no
/// argument is searched again at every level it is nested in.
struct Shape {
    /// For each byte, the position of the `}` that closes it when it is a `{` that closes.
    closing: Vec<Option<usize>>,
    /// For each byte, the position of the first `]` at or after it (`len` when there is none).
    next_bracket: Vec<usize>,
}

impl Shape {
    fn of(text: &str) -> Shape {
        charge(2 * text.len());
        let bytes = text.as_bytes();
        let mut closing = vec![None; bytes.len()];
        // Nesting is at most MAX_ANSWER_DEPTH here (checked before), so this stays small.
        let mut open = Vec::new();
        for (i, &byte) in bytes.iter().enumerate() {
            match byte {
                b'{' => open.push(i),
                b'}' => {
                    if let Some(opened) = open.pop() {
                        closing[opened] = Some(i);
                    }
                }
                _ => {}
            }
        }
        let mut next_bracket = vec![bytes.len(); bytes.len() + 1];
        for i in (0..bytes.len()).rev() {
            next_bracket[i] = if bytes[i] == b']' { i } else { next_bracket[i + 1] };
        }
        Shape { closing, next_bracket }
    }

    /// The argument at `at` within a range ending at `end`: the content of a `{...}` (to the
    /// range's end when it does not close there), or else one character; and where the text
    /// after it starts.
    fn argument(&self, text: &str, at: usize, end: usize) -> ((usize, usize), usize) {
        if at >= end {
            return ((end, end), end);
        }
        if text.as_bytes()[at] == b'{' {
            return match self.closing[at].filter(|&close| close < end) {
                Some(close) => ((at + 1, close), close + 1),
                None => ((at + 1, end), end),
            };
        }
        let width = text[at..].chars().next().map_or(1, char::len_utf8);
        ((at, at + width), at + width)
    }
}

/// Translates `text[range]` into `out` up to its first `\frac` or `\sqrt`, whose arguments and
/// the rest of the range it leaves on `todo`.
fn translate_until_nested(
    text: &str,
    shape: &Shape,
    (mut at, end): (usize, usize),
    depth: usize,
    out: &mut String,
    todo: &mut Vec<Task>,
) {
    let nested = |start, end| Task::Translate {
        start,
        end,
        depth: depth + 1,
    };
    while at < end {
        let rest = &text[at..end];
        if rest.starts_with("\\frac") {
            let (numerator, after) = shape.argument(text, at + "\\frac".len(), end);
            let (denominator, after) = shape.argument(text, after, end);
            out.push_str("((");
            todo.extend([
                Task::Translate {
                    start: after,
                    end,
                    depth,
                },
                Task::Emit("))"),
                nested(denominator.0, denominator.1),
                Task::Emit(")/("),
                nested(numerator.0, numerator.1),
            ]);
            return;
        } else if rest.starts_with("\\sqrt[") {
            let index_start = at + "\\sqrt[".len();
            let index_end = shape.next_bracket[index_start].min(end);
            let (radicand, after) = if index_end < end {
                shape.argument(text, index_end + 1, end)
            } else {
                ((end, end), end)
            };
            out.push_str("((");
            todo.extend([
                Task::Translate {
                    start: after,
                    end,
                    depth,
                },
                Task::Emit(")))"),
                nested(index_start, index_end),
                Task::Emit(")**(1/("),
                nested(radicand.0, radicand.1),
            ]);
            return;
        } else if rest.starts_with("\\sqrt") {
            let (radicand, after) = shape.argument(text, at + "\\sqrt".len(), end);
            out.push_str("sqrt(");
            todo.extend([
                Task::Translate {
                    start: after,
                    end,
                    depth,
                },
                Task::Emit(")"),
                nested(radicand.0, radicand.1),
            ]);
            return;
        } else if rest.starts_with("\\cdot") || rest.starts_with("\\times") {
            out.push('*');
            at += if rest.starts_with("\\cdot") {
                "\\cdot".len()
            } else {
                "\\times".len()
            };
        } else if rest.starts_with('\\') {
            // Any other command keeps its name: `\pi` -> `pi`.
            at += 1;
        } else if rest.starts_with('^') {
            out.push_str("**");
            at += 1;
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(match c {
                '{' => '(',
                '}' => ')',
                other => other,
            });
            at += c.len_utf8();
        }
    }
}

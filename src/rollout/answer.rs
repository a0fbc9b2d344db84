//! Final answers: finding one in a message (`\boxed{...}` or `<answer>...</answer>`), and
//! deciding on the host, exactly, whether two plain numbers are equal.
//!
//! What the host cannot decide (radicals, symbols) goes to sympy in the trajectory's slot; see
//! [`crate::rollout::reward`] and [`latex_to_sympy`].

/// The final answer in `text`: the content of the last `\boxed{...}` (braces balanced) or the
/// last `<answer>...</answer>`, whichever comes later, trimmed.
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

fn last_boxed(text: &str) -> Option<(usize, String)> {
    let mut found = None;
    for (at, _) in text.match_indices("\\boxed") {
        let after = text[at + "\\boxed".len()..].trim_start();
        if let Some(inner) = after.strip_prefix('{').and_then(balanced_prefix) {
            found = Some((at, inner.to_owned()));
        }
    }
    found
}

/// The text before the `}` that closes an already opened `{`, if it closes.
fn balanced_prefix(text: &str) -> Option<&str> {
    let mut depth = 1usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[..i]);
                }
            }
            _ => {}
        }
    }
    None
}

fn last_answer_tag(text: &str) -> Option<(usize, String)> {
    let at = text.rfind("<answer>")?;
    let inner = &text[at + "<answer>".len()..];
    let end = inner.find("</answer>")?;
    Some((at, inner[..end].to_owned()))
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
    /// `numerator / denominator` reduced, or `None` for a zero denominator.
    pub fn new(numerator: i128, denominator: i128) -> Option<Rational> {
        if denominator == 0 {
            return None;
        }
        let divisor = gcd(numerator.unsigned_abs(), denominator.unsigned_abs()).max(1) as i128;
        let sign = if denominator < 0 { -1 } else { 1 };
        Some(Rational {
            numerator: sign * numerator / divisor,
            denominator: sign * denominator / divisor,
        })
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
    Rational::new(
        if negative { -value.numerator } else { value.numerator },
        value.denominator,
    )
}

/// Strips what does not change a number's value: `$`, spaces, LaTeX spacing, a trailing unit in
/// `\text{}`/`\mathrm{}`, a trailing `%`, thousands separators, `\dfrac`/`\tfrac` spelling.
fn normalize(answer: &str) -> String {
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
pub fn latex_to_sympy(latex: &str) -> String {
    let text = normalize(latex).replace("\\left", "").replace("\\right", "");
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text.as_str();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("\\frac") {
            let (a, after) = braced(after);
            let (b, after) = braced(after);
            out.push_str(&format!("(({})/({}))", latex_to_sympy(a), latex_to_sympy(b)));
            rest = after;
        } else if let Some(after) = rest.strip_prefix("\\sqrt[") {
            let end = after.find(']').unwrap_or(after.len());
            let (x, after2) = braced(after.get(end + 1..).unwrap_or(""));
            out.push_str(&format!(
                "(({})**(1/({})))",
                latex_to_sympy(x),
                latex_to_sympy(&after[..end])
            ));
            rest = after2;
        } else if let Some(after) = rest.strip_prefix("\\sqrt") {
            let (x, after) = braced(after);
            out.push_str(&format!("sqrt({})", latex_to_sympy(x)));
            rest = after;
        } else if let Some(after) = rest.strip_prefix("\\cdot").or_else(|| rest.strip_prefix("\\times")) {
            out.push('*');
            rest = after;
        } else if let Some(after) = rest.strip_prefix('\\') {
            // Any other command keeps its name: `\pi` -> `pi`.
            rest = after;
        } else if let Some(after) = rest.strip_prefix('^') {
            out.push_str("**");
            rest = after;
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(match c {
                '{' => '(',
                '}' => ')',
                other => other,
            });
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The content of a leading `{...}` and what follows, or one character when there is no brace.
fn braced(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    if let Some(inner) = text.strip_prefix('{') {
        if let Some(content) = balanced_prefix(inner) {
            return (content, &inner[content.len() + 1..]);
        }
        return (inner, "");
    }
    match text.chars().next() {
        Some(c) => text.split_at(c.len_utf8()),
        None => ("", ""),
    }
}

//! Google-style docstrings: the description a tool's schema shows, and the `Args:` section's
//! parameter descriptions.
//!
//! The rules: the docstring is cleaned like `inspect.cleandoc`; a line at the left margin that
//! is a known section header (`Args:`, `Returns:`, `Raises:`, ...) starts a section; the text
//! before the first section is the description, with each paragraph's lines joined by spaces.
//! In `Args:` (or `Arguments:`, `Parameters:`, `Keyword Args:`), each entry is
//! `name: text` or `name (type): text` at the section's first indentation, and more deeply
//! indented lines continue it. Other styles (numpy's underlined headers) stay in the
//! description.

use std::sync::LazyLock;

use regex::Regex;

/// What a tool's docstring says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Docstring {
    /// The text before the first section.
    pub description: String,
    /// `(parameter, description)` from the `Args:` sections, in order.
    pub params: Vec<(String, String)>,
}

static SECTION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters|Returns|Return|Yields|Yield|Raises|Examples?|Notes?|Attributes|Todo|See Also|Warnings?|References?):\s*$",
    )
    .expect("a valid regex")
});

static ENTRY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\*{0,2}([A-Za-z_][A-Za-z0-9_]*)\s*(?:\([^)]*\))?\s*:\s*(.*)$").expect("a valid regex")
});

const ARGS_SECTIONS: [&str; 6] = [
    "Args",
    "Arguments",
    "Parameters",
    "Params",
    "Keyword Args",
    "Keyword Arguments",
];

/// Reads a docstring's description and parameter descriptions.
pub(super) fn parse_docstring(raw: &str) -> Docstring {
    let lines = cleandoc(raw);
    let mut docstring = Docstring::default();
    let mut section: Option<&str> = None;
    let mut body: Vec<&str> = Vec::new();
    for line in &lines {
        if let Some(header) = SECTION.captures(line) {
            read_section(section, &body, &mut docstring);
            body.clear();
            section = header.get(1).map(|m| m.as_str());
        } else {
            body.push(line);
        }
    }
    read_section(section, &body, &mut docstring);
    docstring
}

/// Takes what `docstring` needs from one section's `body` (`None`: the description).
fn read_section(section: Option<&str>, body: &[&str], docstring: &mut Docstring) {
    match section {
        None => docstring.description = paragraphs(body),
        Some(name) if ARGS_SECTIONS.contains(&name) => docstring.params.extend(entries(body)),
        Some(_) => {}
    }
}

/// `inspect.cleandoc`: tabs expanded, the first line stripped, the rest dedented by their
/// common indentation, blank lines at either end removed.
fn cleandoc(raw: &str) -> Vec<String> {
    let lines: Vec<String> = raw.replace('\t', "        ").lines().map(str::to_owned).collect();
    let margin = lines
        .iter()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .min()
        .unwrap_or(0);
    let mut cleaned: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                l.trim().to_owned()
            } else {
                l.get(margin..).unwrap_or("").trim_end().to_owned()
            }
        })
        .collect();
    while cleaned.last().is_some_and(|l| l.is_empty()) {
        cleaned.pop();
    }
    let first = cleaned.iter().position(|l| !l.is_empty()).unwrap_or(cleaned.len());
    cleaned.drain(..first);
    cleaned
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Lines joined with spaces within a paragraph, paragraphs separated by a blank line.
fn paragraphs(lines: &[&str]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in lines.iter().map(|l| l.trim()).chain([""]) {
        if line.is_empty() {
            if !current.is_empty() {
                out.push(current.join(" "));
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    out.join("\n\n")
}

/// The entries of an `Args:` section.
fn entries(lines: &[&str]) -> Vec<(String, String)> {
    let Some(entry_indent) = lines.iter().find(|l| !l.trim().is_empty()).map(|l| indent(l)) else {
        return Vec::new();
    };
    let mut found: Vec<(String, String)> = Vec::new();
    for line in lines.iter().filter(|l| !l.trim().is_empty()) {
        let text = line.trim();
        let new_entry = if indent(line) <= entry_indent {
            ENTRY.captures(text)
        } else {
            None
        };
        match (new_entry, found.last_mut()) {
            (Some(entry), _) => found.push((entry[1].to_owned(), entry[2].trim().to_owned())),
            (None, Some((_, description))) => {
                if !description.is_empty() {
                    description.push(' ');
                }
                description.push_str(text);
            }
            // Text before the first entry is not about any parameter.
            (None, None) => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_stops_at_the_first_section_and_args_are_read() {
        let doc = parse_docstring(
            "Convert a temperature.\n\n    Works for the three\n    usual scales.\n\n    Args:\n        value (float): The\n            temperature.\n        unit: One of `C`, `F`, `K`.\n\n    Returns:\n        x: not a parameter.\n    ",
        );
        assert_eq!(
            doc.description,
            "Convert a temperature.\n\nWorks for the three usual scales."
        );
        assert_eq!(
            doc.params,
            vec![
                ("value".to_owned(), "The temperature.".to_owned()),
                ("unit".to_owned(), "One of `C`, `F`, `K`.".to_owned())
            ]
        );
    }

    #[test]
    fn one_line_and_numpy_docstrings_are_all_description() {
        assert_eq!(
            parse_docstring("  Add two numbers.  "),
            Docstring {
                description: "Add two numbers.".to_owned(),
                params: vec![]
            }
        );
        let numpy = parse_docstring("Scale.\n\nParameters\n----------\nx : float\n");
        assert_eq!(numpy.description, "Scale.\n\nParameters ---------- x : float");
        assert!(numpy.params.is_empty());
    }
}

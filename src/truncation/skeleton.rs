//! Python code cells reduced to their skeleton: what the model needs to remember about a cell
//! whose state still lives in the notebook, without the bodies it no longer needs to read.
//!
//! The skeleton keeps imports; `def` and `class` signatures (decorators and `async` included)
//! with the first line of their docstring and `...` for a body; top-level assignment targets as
//! `name = ...`; and top-level `for`/`with` targets. Code that does not parse (a partial cell, a
//! cell magic) gets a line-based skeleton instead, and every skeleton ends with a comment saying
//! how many lines were left out, so nothing disappears silently.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{LazyLock, Mutex};

use regex::Regex;
use rustpython_parser::Parse;
use rustpython_parser::ast::{self, Constant, Expr, Ranged, Stmt};

const INDENT: &str = "    ";

/// A code cell reduced to its skeleton.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skeleton {
    /// The skeleton's source text, ending with a comment that counts the omitted lines.
    pub text: String,
    /// Every top-level name the cell defines, in order of first definition.
    pub names: Vec<String>,
    /// Whether the cell parsed as Python; `false` means the line-based fallback was used.
    pub parsed: bool,
}

/// Reduces a Python cell to its [`Skeleton`].
///
/// ```
/// let cell = "import pandas as pd\ndf = pd.read_csv('x.csv')\ndef f(x):\n    \"\"\"Scale.\"\"\"\n    return 2 * x\nprint(f(df))\n";
/// let skeleton = rollbox::truncation::skeleton::python_skeleton(cell);
/// assert_eq!(skeleton.names, ["pd", "df", "f"]);
/// assert!(skeleton.text.starts_with("import pandas as pd\ndf = ...\ndef f(x):\n    \"\"\"Scale.\"\"\"\n    ...\n"));
/// ```
pub fn python_skeleton(code: &str) -> Skeleton {
    let (parsable, magics) = comment_out_magics(code);
    let total_lines = code.lines().filter(|line| !line.trim().is_empty()).count();
    let mut skeleton = match ast::Suite::parse(&parsable, "<cell>") {
        Ok(suite) => {
            let mut builder = SkeletonBuilder {
                source: &parsable,
                lines: magics,
                names: Vec::new(),
            };
            builder.suite(&suite, 0, true);
            Skeleton {
                text: builder.lines.join("\n"),
                names: builder.names,
                parsed: true,
            }
        }
        Err(_) => line_based_skeleton(code),
    };
    let kept_lines = skeleton.text.lines().filter(|line| !line.trim().is_empty()).count();
    let omitted = total_lines.saturating_sub(kept_lines);
    if !skeleton.text.is_empty() {
        skeleton.text.push('\n');
    }
    let how = if skeleton.parsed {
        ""
    } else {
        "; the cell did not parse, so this skeleton is line-based"
    };
    skeleton.text.push_str(&format!(
        "# [rollbox: cell compacted to its skeleton, {omitted} of {total_lines} lines omitted{how}]"
    ));
    dedupe_names(&mut skeleton.names);
    skeleton
}

/// The top-level names a Python cell defines (imports, functions, classes, assignment targets),
/// as [`python_skeleton`] finds them.
pub fn defined_names(code: &str) -> Vec<String> {
    python_skeleton(code).names
}

/// Most skeletons a [`SkeletonCache`] remembers (a few MB); when full it is cleared, which costs
/// parsing again, never a wrong skeleton.
const SKELETON_CACHE_CAPACITY: usize = 8_192;

/// Skeletons already built, keyed by a 64-bit hash of the cell's code. Parsing is the costliest
/// step of compaction after tokenising, and the rollout loop compacts the same cells before
/// every model call, so a cell is parsed once per cache rather than once per call.
#[derive(Debug, Default)]
pub(crate) struct SkeletonCache(Mutex<HashMap<u64, Skeleton>>);

impl SkeletonCache {
    /// [`python_skeleton`] of `code`, built at most once while remembered.
    pub fn skeleton(&self, code: &str) -> Skeleton {
        // DefaultHasher::new() uses fixed keys, so keys are stable within the process.
        let mut hasher = DefaultHasher::new();
        code.hash(&mut hasher);
        let key = hasher.finish();
        if let Some(skeleton) = self.lock().get(&key) {
            return skeleton.clone();
        }
        let skeleton = python_skeleton(code);
        let mut cache = self.lock();
        if cache.len() >= SKELETON_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, skeleton.clone());
        skeleton
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Skeleton>> {
        // Inserts are single operations, so a poisoned cache still holds only whole skeletons.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// IPython magics (`%time`, `!pip install`, `%%capture`) are not Python. Turning their first
/// character into `#` keeps every byte offset the same, so the AST ranges still index `code`'s
/// layout, and the magic lines themselves are returned to be kept verbatim.
fn comment_out_magics(code: &str) -> (String, Vec<String>) {
    let mut magics = Vec::new();
    let mut out = String::with_capacity(code.len());
    for line in code.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('%') || trimmed.starts_with('!') {
            magics.push(trimmed.trim_end().to_owned());
            let indent = line.len() - trimmed.len();
            out.push_str(&line[..indent]);
            out.push('#');
            out.push_str(&trimmed[1..]);
        } else {
            out.push_str(line);
        }
    }
    (out, magics)
}

struct SkeletonBuilder<'a> {
    source: &'a str,
    lines: Vec<String>,
    names: Vec<String>,
}

impl SkeletonBuilder<'_> {
    fn text(&self, node: &impl Ranged) -> &str {
        let range = node.range();
        self.source
            .get(usize::from(range.start())..usize::from(range.end()))
            .unwrap_or("")
    }

    fn push(&mut self, depth: usize, line: &str) {
        // Multi-line statements (an import in parentheses) keep their own continuation lines.
        self.lines.push(format!("{}{line}", INDENT.repeat(depth)));
    }

    /// `top` is true where Python's scope is the module: there the names defined are live
    /// notebook state and are recorded.
    fn suite(&mut self, body: &[Stmt], depth: usize, top: bool) {
        for stmt in body {
            self.statement(stmt, depth, top);
        }
    }

    fn statement(&mut self, stmt: &Stmt, depth: usize, top: bool) {
        match stmt {
            Stmt::Import(import) => {
                let line = self.text(stmt).to_owned();
                self.push(depth, &line);
                if top {
                    for alias in &import.names {
                        let bound = match &alias.asname {
                            Some(asname) => asname.as_str(),
                            // `import a.b` binds `a`.
                            None => alias.name.as_str().split('.').next().unwrap_or(""),
                        };
                        self.names.push(bound.to_owned());
                    }
                }
            }
            Stmt::ImportFrom(import) => {
                let line = self.text(stmt).to_owned();
                self.push(depth, &line);
                if top {
                    for alias in &import.names {
                        let bound = alias.asname.as_ref().unwrap_or(&alias.name).as_str();
                        if bound != "*" {
                            self.names.push(bound.to_owned());
                        }
                    }
                }
            }
            Stmt::FunctionDef(def) => {
                self.definition(stmt, &def.decorator_list, &def.body, depth, false);
                self.record(top, def.name.as_str());
            }
            Stmt::AsyncFunctionDef(def) => {
                self.definition(stmt, &def.decorator_list, &def.body, depth, false);
                self.record(top, def.name.as_str());
            }
            Stmt::ClassDef(class) => {
                self.definition(stmt, &class.decorator_list, &class.body, depth, true);
                self.record(top, class.name.as_str());
            }
            Stmt::Assign(assign) => {
                let targets: Vec<&str> = assign.targets.iter().map(|t| self.text(t)).collect();
                let line = format!("{} = ...", targets.join(" = "));
                self.push(depth, &line);
                if top {
                    for target in &assign.targets {
                        self.record_target(target);
                    }
                }
            }
            Stmt::AnnAssign(assign) => {
                let target = self.text(assign.target.as_ref());
                let annotation = self.text(assign.annotation.as_ref());
                let line = match assign.value {
                    Some(_) => format!("{target}: {annotation} = ..."),
                    None => format!("{target}: {annotation}"),
                };
                self.push(depth, &line);
                if top {
                    self.record_target(&assign.target);
                }
            }
            // Module-level control flow still defines module-level names (`try: import x`,
            // `if DEBUG: def f(): ...`), so its body is flattened into the skeleton.
            Stmt::For(for_loop) => {
                self.loop_or_with_target(&for_loop.target, &for_loop.body, &for_loop.orelse, depth, top)
            }
            Stmt::AsyncFor(for_loop) => {
                self.loop_or_with_target(&for_loop.target, &for_loop.body, &for_loop.orelse, depth, top)
            }
            Stmt::With(with) => self.with_items(&with.items, &with.body, depth, top),
            Stmt::AsyncWith(with) => self.with_items(&with.items, &with.body, depth, top),
            Stmt::If(branch) => {
                self.suite(&branch.body, depth, top);
                self.suite(&branch.orelse, depth, top);
            }
            Stmt::While(repeat) => {
                self.suite(&repeat.body, depth, top);
                self.suite(&repeat.orelse, depth, top);
            }
            Stmt::Try(attempt) => self.try_blocks(
                &attempt.body,
                &attempt.handlers,
                &attempt.orelse,
                &attempt.finalbody,
                depth,
                top,
            ),
            Stmt::TryStar(attempt) => self.try_blocks(
                &attempt.body,
                &attempt.handlers,
                &attempt.orelse,
                &attempt.finalbody,
                depth,
                top,
            ),
            // Expressions (`df.head()`, `print(x)`), control statements and the rest change no
            // names the model must remember; they are what the omitted-lines count accounts for.
            _ => {}
        }
    }

    fn record(&mut self, top: bool, name: &str) {
        if top {
            self.names.push(name.to_owned());
        }
    }

    /// Names bound by an assignment target: `x`, `a, b`, `[a, *rest]`. Attribute and subscript
    /// targets (`self.x`, `d["k"]`) bind no new name.
    fn record_target(&mut self, target: &Expr) {
        match target {
            Expr::Name(name) => self.names.push(name.id.as_str().to_owned()),
            Expr::Tuple(tuple) => tuple.elts.iter().for_each(|elt| self.record_target(elt)),
            Expr::List(list) => list.elts.iter().for_each(|elt| self.record_target(elt)),
            Expr::Starred(starred) => self.record_target(&starred.value),
            _ => {}
        }
    }

    fn loop_or_with_target(&mut self, target: &Expr, body: &[Stmt], orelse: &[Stmt], depth: usize, top: bool) {
        let line = format!("for {} in ...: ...", self.text(target));
        self.push(depth, &line);
        if top {
            self.record_target(target);
        }
        self.suite(body, depth, top);
        self.suite(orelse, depth, top);
    }

    fn with_items(&mut self, items: &[ast::WithItem], body: &[Stmt], depth: usize, top: bool) {
        for item in items {
            if let Some(vars) = &item.optional_vars {
                let line = format!("with ... as {}: ...", self.text(vars.as_ref()));
                self.push(depth, &line);
                if top {
                    self.record_target(vars);
                }
            }
        }
        self.suite(body, depth, top);
    }

    fn try_blocks(
        &mut self,
        body: &[Stmt],
        handlers: &[ast::ExceptHandler],
        orelse: &[Stmt],
        finalbody: &[Stmt],
        depth: usize,
        top: bool,
    ) {
        self.suite(body, depth, top);
        for ast::ExceptHandler::ExceptHandler(handler) in handlers {
            self.suite(&handler.body, depth, top);
        }
        self.suite(orelse, depth, top);
        self.suite(finalbody, depth, top);
    }

    /// A `def` or `class`: decorators, the header up to its colon, the docstring's first line,
    /// then `...` (or, for a class, the skeleton of its methods and class attributes).
    fn definition(&mut self, stmt: &Stmt, decorators: &[Expr], body: &[Stmt], depth: usize, is_class: bool) {
        for decorator in decorators {
            let line = format!("@{}", self.text(decorator));
            self.push(depth, &line);
        }
        let header = self.header(stmt, body);
        self.push(depth, &header);
        if let Some(line) = docstring_first_line(body) {
            self.push(depth + 1, &format!("\"\"\"{line}\"\"\""));
        }
        let before = self.lines.len();
        if is_class {
            let members = body.iter().filter(|member| !is_docstring(member));
            for member in members {
                self.statement(member, depth + 1, false);
            }
        }
        if self.lines.len() == before {
            self.push(depth + 1, "...");
        }
    }

    /// The header text from the `def`/`class` keyword (the statement's range starts there, after
    /// any decorators) to its colon, with a trailing comment removed.
    fn header(&self, stmt: &Stmt, body: &[Stmt]) -> String {
        let start = usize::from(stmt.range().start());
        let end = body.first().map_or(usize::from(stmt.range().end()), |first| {
            usize::from(first.range().start())
        });
        let text = self.source.get(start..end).unwrap_or("").trim_end();
        // Scan colons from the right: the header's colon is the last one followed only by
        // whitespace or a comment (a colon inside that comment is followed by more text).
        for (index, _) in text.rmatch_indices(':') {
            let after = text[index + 1..].trim_start();
            if after.is_empty() || after.starts_with('#') {
                return text[..=index].to_owned();
            }
        }
        text.to_owned()
    }
}

fn is_docstring(stmt: &Stmt) -> bool {
    docstring_of(stmt).is_some()
}

fn docstring_of(stmt: &Stmt) -> Option<&str> {
    match stmt {
        Stmt::Expr(expr) => match expr.value.as_ref() {
            Expr::Constant(ast::ExprConstant {
                value: Constant::Str(text),
                ..
            }) => Some(text),
            _ => None,
        },
        _ => None,
    }
}

fn docstring_first_line(body: &[Stmt]) -> Option<String> {
    let docstring = docstring_of(body.first()?)?;
    let line = docstring.lines().map(str::trim).find(|line| !line.is_empty())?;
    // A line holding `"""` would end the rendered docstring early; such docstrings are rare
    // enough to simply leave out.
    (!line.contains("\"\"\"")).then(|| line.to_owned())
}

static TOP_LEVEL_ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*(?::[^=]*)?=[^=]").expect("static regex is valid")
});
static DEFINITION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w*)").expect("static regex is valid"));
static IMPORT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:import\s+(.+)|from\s+\S+\s+import\s+(.+))$").expect("static regex is valid"));

/// The skeleton of code that does not parse: the lines that look like imports, definitions,
/// decorators, magics or top-level assignments, found line by line.
fn line_based_skeleton(code: &str) -> Skeleton {
    let mut lines = Vec::new();
    let mut names = Vec::new();
    for line in code.lines() {
        let trimmed = line.trim_end();
        let stripped = trimmed.trim_start();
        let top = stripped.len() == trimmed.len();
        if stripped.starts_with('%') || stripped.starts_with('!') || stripped.starts_with('@') {
            lines.push(trimmed.to_owned());
        } else if let Some(captures) = IMPORT.captures(stripped) {
            lines.push(trimmed.to_owned());
            if top {
                let imported = captures.get(1).or_else(|| captures.get(2)).map_or("", |m| m.as_str());
                names.extend(imported_names(imported, captures.get(1).is_some()));
            }
        } else if let Some(captures) = DEFINITION.captures(stripped) {
            lines.push(trimmed.to_owned());
            if top {
                names.push(captures[1].to_owned());
            }
        } else if top && let Some(captures) = TOP_LEVEL_ASSIGNMENT.captures(stripped) {
            let targets = &captures[1];
            lines.push(format!("{targets} = ..."));
            names.extend(targets.split(',').map(|name| name.trim().to_owned()));
        }
    }
    Skeleton {
        text: lines.join("\n"),
        names,
        parsed: false,
    }
}

/// Names bound by the part of an import line after `import`: `a as b, c.d` binds `b` and `c`
/// for a plain import.
fn imported_names(imported: &str, plain_import: bool) -> Vec<String> {
    imported
        .trim_matches(|c: char| c == '(' || c == ')' || c.is_whitespace())
        .split(',')
        .filter_map(|item| {
            let mut words = item.split_whitespace();
            let name = words.next()?;
            let bound = match (words.next(), words.next()) {
                (Some("as"), Some(alias)) => alias,
                _ if plain_import => name.split('.').next().unwrap_or(name),
                _ => name,
            };
            let valid = bound.chars().all(|c| c.is_alphanumeric() || c == '_') && !bound.is_empty();
            valid.then(|| bound.to_owned())
        })
        .collect()
}

fn dedupe_names(names: &mut Vec<String>) {
    let mut seen = HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
}

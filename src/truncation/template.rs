//! A model's own chat template: the Jinja `chat_template` of its `tokenizer_config.json` (or its
//! `chat_template.jinja`), rendered with minijinja the way Hugging Face's `apply_chat_template`
//! renders it with Jinja2.
//!
//! What is Hugging Face-compatible, and why each is needed by real templates:
//! - `trim_blocks` and `lstrip_blocks` on, as `apply_chat_template` sets them.
//! - Python's string and dict methods (`strip`, `split`, `startswith`, `items`, `get`, ...) from
//!   minijinja-contrib's pycompat: Qwen's and DeepSeek's templates call them.
//! - `raise_exception(message)`: templates that check role order call it (Mistral, Gemma).
//! - `strftime_now(format)`: Llama 3.x templates put today's date in the system block (UTC here).
//! - `tojson` with Python's `json.dumps` output (`", "` and `": "` separators, `indent`, no
//!   HTML escaping, `ensure_ascii` off unless asked): tool schemas are rendered with it, so
//!   minijinja's own compact `tojson` would count different tokens.
//! - The special tokens of the config (`bos_token`, `eos_token`, `unk_token`, `pad_token`),
//!   strings or `AddedToken` objects alike.
//!
//! A template error, at load or render time, is [`TruncationError::Template`], naming the
//! template and the line in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

use crate::chat::Message;

use super::TruncationError;

/// The file beside `tokenizer.json` that holds the special tokens and, usually, the template.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// The file newer models ship their template in; it wins over the config's `chat_template`, as in
/// `transformers`.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// The tokenizer file of a model folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The special-token keys of a `tokenizer_config.json` that `apply_chat_template` passes to the
/// template.
const SPECIAL_TOKEN_KEYS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

/// Which chat template to count with, as the CLI's `--chat-template` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChoice {
    /// The model's own Jinja template; the built-in `qwen` one, with a warning, when the model
    /// ships none.
    Auto,
    /// The built-in ChatML template ([`super::ChatTemplate::qwen_chatml`]).
    Qwen,
    /// No template ([`super::ChatTemplate::bare`]).
    Bare,
    /// A Jinja template read from this file (the model's special tokens still apply).
    File(PathBuf),
}

impl FromStr for TemplateChoice {
    type Err = std::convert::Infallible;

    /// `auto`, `qwen` and `bare` are the names; anything else is a path to a Jinja file.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "auto" => TemplateChoice::Auto,
            "qwen" => TemplateChoice::Qwen,
            "bare" => TemplateChoice::Bare,
            path => TemplateChoice::File(PathBuf::from(path)),
        })
    }
}

/// Where a model's files are: `tokenizer.json`, and the folder its config and template sit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// The folder with `tokenizer_config.json` and perhaps `chat_template.jinja`; `None` when a
    /// `tokenizer.json` was given alone.
    pub folder: Option<PathBuf>,
}

impl ModelFiles {
    /// A model folder (the files a downloaded model has) or a `tokenizer.json` alone.
    pub fn locate(path: &Path) -> ModelFiles {
        if path.is_dir() {
            ModelFiles {
                tokenizer: path.join(TOKENIZER_FILE),
                folder: Some(path.to_owned()),
            }
        } else {
            ModelFiles {
                tokenizer: path.to_owned(),
                folder: None,
            }
        }
    }
}

/// A compiled Jinja chat template with the special tokens it renders with.
#[derive(Debug)]
pub struct JinjaChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for error messages.
    name: String,
    /// `bos_token` and friends, as the template sees them.
    special_tokens: Vec<(String, String)>,
    /// The config's `tool_use` template, used when tools are offered (as `transformers` picks it).
    has_tool_use: bool,
}

/// The name the default template is stored under in the environment.
const DEFAULT_TEMPLATE: &str = "default";
/// The name of the named template `transformers` picks when tools are given.
const TOOL_USE_TEMPLATE: &str = "tool_use";

impl JinjaChatTemplate {
    /// The template a model folder ships: `chat_template.jinja` if present, else the config's
    /// `chat_template`. `Ok(None)` when it ships neither.
    pub fn from_model_folder(folder: &Path) -> Result<Option<JinjaChatTemplate>, TruncationError> {
        let config = read_config(folder)?;
        let special_tokens = special_tokens(config.as_ref());
        let jinja_file = folder.join(CHAT_TEMPLATE_FILE);
        if jinja_file.is_file() {
            let source = read(&jinja_file)?;
            let name = jinja_file.display().to_string();
            return Ok(Some(JinjaChatTemplate::new(
                name,
                vec![(DEFAULT_TEMPLATE.to_owned(), source)],
                special_tokens,
            )?));
        }
        let config_path = folder.join(TOKENIZER_CONFIG);
        let sources = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(source)) => vec![(DEFAULT_TEMPLATE.to_owned(), source.clone())],
            // Several named templates: [{"name": "default", "template": "..."}, ...].
            Some(Json::Array(named)) => named
                .iter()
                .filter_map(|entry| {
                    Some((
                        entry.get("name")?.as_str()?.to_owned(),
                        entry.get("template")?.as_str()?.to_owned(),
                    ))
                })
                .collect(),
            Some(_) => {
                return Err(TruncationError::ReadModel {
                    path: config_path,
                    reason: "`chat_template` is neither a string nor a list of named templates".to_owned(),
                });
            }
        };
        let name = format!("{} (chat_template)", config_path.display());
        JinjaChatTemplate::new(name, sources, special_tokens).map(Some)
    }

    /// A template read from `path`, with the special tokens of the model `folder` (if any).
    pub fn from_file(path: &Path, folder: Option<&Path>) -> Result<JinjaChatTemplate, TruncationError> {
        let source = read(path)?;
        let config = match folder {
            Some(folder) => read_config(folder)?,
            None => None,
        };
        JinjaChatTemplate::new(
            path.display().to_string(),
            vec![(DEFAULT_TEMPLATE.to_owned(), source)],
            special_tokens(config.as_ref()),
        )
    }

    /// Compiles `source` (named `name` in errors) with the given special tokens.
    pub fn from_source(
        name: impl Into<String>,
        source: impl Into<String>,
        special_tokens: &[(&str, &str)],
    ) -> Result<JinjaChatTemplate, TruncationError> {
        let tokens = special_tokens
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        JinjaChatTemplate::new(name.into(), vec![(DEFAULT_TEMPLATE.to_owned(), source.into())], tokens)
    }

    fn new(
        name: String,
        sources: Vec<(String, String)>,
        special_tokens: Vec<(String, String)>,
    ) -> Result<JinjaChatTemplate, TruncationError> {
        let mut env = hugging_face_environment();
        let has_tool_use = sources.iter().any(|(key, _)| key == TOOL_USE_TEMPLATE);
        if !sources.iter().any(|(key, _)| key == DEFAULT_TEMPLATE) {
            return Err(TruncationError::ReadModel {
                path: PathBuf::from(&name),
                reason: "no template is named `default`".to_owned(),
            });
        }
        for (key, source) in sources {
            env.add_template_owned(key, source)
                .map_err(|source| TruncationError::template("compile", &name, source))?;
        }
        Ok(JinjaChatTemplate {
            env,
            name,
            special_tokens,
            has_tool_use,
        })
    }

    /// Where the template came from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The prompt text for `messages`, the tool schemas `tools` (OpenAI's `tools` array; `none`
    /// is passed to the template when empty, as a server does) and the reply prompt when
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        tools: &[Json],
        add_generation_prompt: bool,
    ) -> Result<String, TruncationError> {
        let key = match !tools.is_empty() && self.has_tool_use {
            true => TOOL_USE_TEMPLATE,
            false => DEFAULT_TEMPLATE,
        };
        let template = self
            .env
            .get_template(key)
            .map_err(|source| TruncationError::template("render", &self.name, source))?;
        let mut context: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(key, value)| (key.clone(), Value::from(value.as_str())))
            .collect();
        context.insert("messages".to_owned(), Value::from(Serde(messages)));
        context.insert("add_generation_prompt".to_owned(), Value::from(add_generation_prompt));
        // `none`, not undefined, when there are no tools: `apply_chat_template` passes
        // `tools=None` and `documents=None`, and templates test `tools is not none`.
        let tools = match tools.is_empty() {
            true => Value::from(()),
            false => Value::from(Serde(tools)),
        };
        context.insert("tools".to_owned(), tools);
        context.insert("documents".to_owned(), Value::from(()));
        let context = Value::from(context);
        template
            .render(context)
            .map_err(|source| TruncationError::template("render", &self.name, source))
    }
}

/// An environment that renders as Hugging Face's `apply_chat_template` does (see the module docs).
fn hugging_face_environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", |format: String| -> String {
        strftime_utc(&format, SystemTime::now())
    });
    env.add_filter("tojson", tojson);
    env
}

fn read(path: &Path) -> Result<String, TruncationError> {
    std::fs::read_to_string(path).map_err(|source| TruncationError::ReadModelFile {
        path: path.to_owned(),
        source,
    })
}

/// The folder's `tokenizer_config.json`, or `None` when it has none.
fn read_config(folder: &Path) -> Result<Option<Json>, TruncationError> {
    let path = folder.join(TOKENIZER_CONFIG);
    if !path.is_file() {
        return Ok(None);
    }
    let text = read(&path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| TruncationError::ReadModel {
            path,
            reason: format!("it is not valid JSON: {error}"),
        })
}

/// The config's special tokens: a string, or an `AddedToken` object with a `content`.
fn special_tokens(config: Option<&Json>) -> Vec<(String, String)> {
    let Some(config) = config else { return Vec::new() };
    SPECIAL_TOKEN_KEYS
        .iter()
        .filter_map(|key| {
            let value = config.get(*key)?;
            let token = value.as_str().or_else(|| value.get("content")?.as_str())?;
            Some(((*key).to_owned(), token.to_owned()))
        })
        .collect()
}

/// `value | tojson(indent=None, ensure_ascii=False, separators=None, sort_keys=False)` as
/// Hugging Face's filter writes it: Python's `json.dumps`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ));
        }
        // json.dumps: ", " without indent, "," with it (the newline separates items).
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let writer = PythonJson {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item,
        key,
    };
    let mut out = String::new();
    writer.write(&value, 0, &mut out)?;
    // Safe: the text is JSON for the prompt, never HTML (the environment does not auto-escape).
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` settings.
struct PythonJson {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
    item: String,
    key: String,
}

impl PythonJson {
    fn write(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None | ValueKind::Undefined => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(value)),
            ValueKind::String => self.write_str(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, depth, '[', ']', &items, |item, out| {
                    self.write(item, depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.write_container(out, depth, '{', '}', &keys, |key, out| {
                    self.write_str(&key.to_string(), out);
                    out.push_str(&self.key);
                    self.write(&value.get_item(key)?, depth + 1, out)
                })?;
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {kind} value is not JSON serializable"),
                ));
            }
        }
        Ok(())
    }

    fn write_container(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        items: &[Value],
        mut each: impl FnMut(&Value, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (index, item) in items.iter().enumerate() {
            if index > 0 {
                out.push_str(&self.item);
            }
            if let Some(indent) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(indent * (depth + 1)));
            }
            each(item, out)?;
        }
        if let Some(indent) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
        out.push(close);
        Ok(())
    }

    fn write_str(&self, text: &str, out: &mut String) {
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A number as Python's `repr` writes it: integers as they are, floats with a `.0` when whole.
fn python_number(value: &Value) -> String {
    // `is_integer`, not `as_i64`, which also takes a whole float that Python writes with `.0`.
    if value.is_integer() {
        return value.to_string();
    }
    let float = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    if float.is_nan() {
        "NaN".to_owned()
    } else if float.is_infinite() {
        if float > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else if float.fract() == 0.0 && float.abs() < 1e16 {
        format!("{float:.1}")
    } else {
        format!("{float}")
    }
}

/// `time.strftime(format)` in UTC for the directives chat templates use (`%d %b %Y` and the
/// like); an unknown directive is kept as written, as glibc does.
fn strftime_utc(format: &str, now: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let seconds = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = seconds / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let (hour, minute, second) = (seconds % 86_400 / 3600, seconds % 3600 / 60, seconds % 60);
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[(days % 7) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hour + 11) % 12 + 1)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_a_known_day() {
        // 2024-07-26 12:34:56 UTC, a Friday.
        let moment = UNIX_EPOCH + std::time::Duration::from_secs(1_721_997_296);
        assert_eq!(strftime_utc("%d %b %Y", moment), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%A %B %e %H:%M:%S %y %%", moment),
            "Friday July 26 12:34:56 24 %"
        );
    }

    #[test]
    fn tojson_writes_python_json_dumps() {
        let env = hugging_face_environment();
        let value: Json = serde_json::json!({"b": [1, 2.0, "é\n\"<"], "a": {}, "c": null, "d": []});
        let render = |expr: &str| {
            env.render_str(expr, minijinja::context! { x => Value::from(Serde(&value)) })
                .expect("renders")
        };
        // serde_json's map is ordered by key, so "a" comes first.
        assert_eq!(
            render("{{ x | tojson }}"),
            r#"{"a": {}, "b": [1, 2.0, "é\n\"<"], "c": null, "d": []}"#
        );
        assert_eq!(
            render("{{ x.b | tojson(indent=2) }}"),
            "[\n  1,\n  2.0,\n  \"é\\n\\\"<\"\n]"
        );
        assert_eq!(
            render("{{ x.b | tojson(ensure_ascii=true) }}"),
            r#"[1, 2.0, "\u00e9\n\"<"]"#
        );
    }
}

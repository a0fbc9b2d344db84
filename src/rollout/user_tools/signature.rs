//! Tool schemas from Python signatures, by parsing the file on the host (never running it).
//!
//! The rules:
//! - every top-level `def` whose name does not start with `_` is a tool; `_private` functions,
//!   methods and nested functions are not (they can still be used by the tools);
//! - it needs a docstring (its description, see [`super::docstring`]) and a type annotation on
//!   every parameter;
//! - annotations map to JSON Schema: `str`, `int`, `float`, `bool`, `list`/`List[T]`/`list[T]`,
//!   `dict`/`Dict[str, T]`/`dict[str, T]`, `Optional[T]`, `T | None`, `Union[...]`,
//!   `Literal[...]` of constants, and `Any`; `typing.X` is read as `X`; anything else (a class,
//!   `tuple`, a quoted annotation) is an error naming the parameter;
//! - a parameter with a default is not required, and a constant default is shown as `default`;
//! - `*args`, `**kwargs`, positional-only parameters and `async def` are errors, since a model
//!   calls tools with one JSON object of named arguments;
//! - decorators are allowed and ignored: the schema is read from the signature as written.

use rustpython_parser::Parse;
use rustpython_parser::ast::{self, Constant, Expr, Ranged, Stmt};
use serde_json::{Map, Value, json};

use super::docstring::parse_docstring;
use super::{ToolsFileError, UserTool};

/// The tools defined in `source`, in file order.
pub(super) fn tools_in(label: &str, source: &str) -> Result<Vec<UserTool>, ToolsFileError> {
    let suite = ast::Suite::parse(source, label).map_err(|error| ToolsFileError::Parse {
        file: label.to_owned(),
        line: line_of(source, usize::from(error.offset)),
        source: Box::new(error),
    })?;
    let mut tools: Vec<(UserTool, usize)> = Vec::new();
    for stmt in &suite {
        let (name, line) = match stmt {
            Stmt::FunctionDef(def) => (def.name.as_str(), line_of(source, usize::from(def.range.start()))),
            Stmt::AsyncFunctionDef(def) => (def.name.as_str(), line_of(source, usize::from(def.range.start()))),
            _ => continue,
        };
        if name.starts_with('_') {
            continue;
        }
        let problem = |problem: String| ToolsFileError::Function {
            file: label.to_owned(),
            line,
            function: name.to_owned(),
            problem,
        };
        let Stmt::FunctionDef(def) = stmt else {
            return Err(problem(
                "`async def` functions cannot be tools; make it a plain `def`".to_owned(),
            ));
        };
        if let Some((_, first)) = tools.iter().find(|(t, _)| t.name == name) {
            return Err(problem(format!(
                "it is defined twice (also on line {first}); keep one definition"
            )));
        }
        if !valid_tool_name(name) {
            return Err(problem(
                "tool names may only use ASCII letters, digits, `_` and `-` (at most 64)".to_owned(),
            ));
        }
        tools.push((tool_from_def(def, source).map_err(problem)?, line));
    }
    Ok(tools.into_iter().map(|(tool, _)| tool).collect())
}

/// OpenAI's rule for function names.
fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The 1-based line of byte `offset` in `source`.
fn line_of(source: &str, offset: usize) -> usize {
    source.as_bytes()[..offset.min(source.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn tool_from_def(def: &ast::StmtFunctionDef, source: &str) -> Result<UserTool, String> {
    let Some(raw_doc) = docstring_of(def) else {
        return Err("it has no docstring; add one: its text before `Args:` becomes the tool's description".to_owned());
    };
    let doc = parse_docstring(raw_doc);
    let args = &def.args;
    if !args.posonlyargs.is_empty() {
        return Err("positional-only parameters (before `/`) cannot be passed by name; remove the `/`".to_owned());
    }
    if let Some(vararg) = &args.vararg {
        return Err(format!(
            "`*{}` cannot be described by a JSON schema; take a list parameter instead",
            vararg.arg.as_str()
        ));
    }
    if let Some(kwarg) = &args.kwarg {
        return Err(format!(
            "`**{}` cannot be described by a JSON schema; take a dict parameter instead",
            kwarg.arg.as_str()
        ));
    }
    let mut properties = Map::new();
    let mut required = Vec::new();
    for param in args.args.iter().chain(&args.kwonlyargs) {
        let name = param.def.arg.as_str().to_owned();
        let Some(annotation) = &param.def.annotation else {
            return Err(format!(
                "parameter `{name}` has no type annotation; annotate it ({SUPPORTED})"
            ));
        };
        let mut schema = annotation_schema(annotation, source).map_err(|why| format!("parameter `{name}`: {why}"))?;
        match &param.default {
            None => required.push(name.clone()),
            Some(default) => {
                if let Some(value) = literal_json(default) {
                    schema["default"] = value;
                }
            }
        }
        if let Some((_, text)) = doc.params.iter().find(|(p, _)| *p == name) {
            schema["description"] = json!(text);
        }
        properties.insert(name, schema);
    }
    if let Some((unknown, _)) = doc.params.iter().find(|(p, _)| !properties.contains_key(p)) {
        return Err(format!(
            "its docstring's `Args:` describes `{unknown}`, which is not a parameter; fix the name or remove the entry"
        ));
    }
    let parameters =
        json!({ "type": "object", "properties": properties, "required": required, "additionalProperties": false });
    Ok(UserTool {
        name: def.name.as_str().to_owned(),
        description: doc.description,
        parameters,
    })
}

/// The annotations the schema rules accept, for error messages.
const SUPPORTED: &str =
    "str, int, float, bool, list[T], dict[str, T], Optional[T], T | None, Union[...], Literal[...] or Any";

fn docstring_of(def: &ast::StmtFunctionDef) -> Option<&str> {
    let Some(Stmt::Expr(first)) = def.body.first() else {
        return None;
    };
    match first.value.as_ref() {
        Expr::Constant(ast::ExprConstant {
            value: Constant::Str(text),
            ..
        }) => Some(text),
        _ => None,
    }
}

/// The JSON Schema of a parameter annotation; an error says what is unsupported.
fn annotation_schema(annotation: &Expr, source: &str) -> Result<Value, String> {
    let text = || {
        source
            .get(usize::from(annotation.start())..usize::from(annotation.end()))
            .unwrap_or("?")
            .to_owned()
    };
    let unsupported = || Err(format!("the annotation `{}` is not supported; use {SUPPORTED}", text()));
    match annotation {
        Expr::Name(_) | Expr::Attribute(_) => match type_name(annotation).as_deref() {
            Some("str") => Ok(json!({ "type": "string" })),
            Some("int") => Ok(json!({ "type": "integer" })),
            Some("float") => Ok(json!({ "type": "number" })),
            Some("bool") => Ok(json!({ "type": "boolean" })),
            Some("list" | "List") => Ok(json!({ "type": "array" })),
            Some("dict" | "Dict") => Ok(json!({ "type": "object" })),
            Some("Any") => Ok(json!({})),
            _ => unsupported(),
        },
        Expr::BinOp(ast::ExprBinOp {
            op: ast::Operator::BitOr,
            ..
        }) => union(&union_members(annotation), source),
        Expr::Subscript(subscript) => generic_schema(subscript, source).unwrap_or_else(unsupported),
        Expr::Constant(ast::ExprConstant {
            value: Constant::Str(_),
            ..
        }) => Err(format!(
            "the quoted annotation `{}` is not supported; write the type without quotes",
            text()
        )),
        _ => unsupported(),
    }
}

/// `str` for `str`, `Optional` for `typing.Optional`; `None` for anything else.
fn type_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Name(name) => Some(name.id.as_str().to_owned()),
        Expr::Attribute(attribute) => match attribute.value.as_ref() {
            Expr::Name(module) if module.id.as_str() == "typing" => Some(attribute.attr.as_str().to_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// `list[T]`, `dict[str, T]`, `Optional[T]`, `Union[...]`, `Literal[...]`; `None` when the
/// generic is not one of them.
fn generic_schema(subscript: &ast::ExprSubscript, source: &str) -> Option<Result<Value, String>> {
    let arguments: Vec<&Expr> = match subscript.slice.as_ref() {
        Expr::Tuple(tuple) => tuple.elts.iter().collect(),
        single => vec![single],
    };
    let schema = match (type_name(&subscript.value)?.as_str(), arguments.as_slice()) {
        ("list" | "List", [item]) => {
            annotation_schema(item, source).map(|items| json!({ "type": "array", "items": items }))
        }
        ("dict" | "Dict", [key, value]) => {
            if type_name(key).as_deref() != Some("str") {
                return Some(Err("JSON object keys are strings: use dict[str, T]".to_owned()));
            }
            annotation_schema(value, source).map(|values| json!({ "type": "object", "additionalProperties": values }))
        }
        ("Optional", [inner]) => annotation_schema(inner, source).map(nullable),
        ("Union", members) => union(members, source),
        ("Literal", values) => literal_schema(values),
        _ => return None,
    };
    Some(schema)
}

/// The members of `A | B | C`, left to right.
fn union_members(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinOp(ast::ExprBinOp {
            left,
            op: ast::Operator::BitOr,
            right,
            ..
        }) => {
            let mut members = union_members(left);
            members.extend(union_members(right));
            members
        }
        other => vec![other],
    }
}

/// A union: `anyOf` its members, with `None` as `{"type": "null"}`; see [`nullable`].
fn union(members: &[&Expr], source: &str) -> Result<Value, String> {
    let is_none = |e: &&&Expr| {
        matches!(
            e,
            Expr::Constant(ast::ExprConstant {
                value: Constant::None,
                ..
            })
        )
    };
    let has_none = members.iter().any(|e| is_none(&e));
    let mut schemas = members
        .iter()
        .filter(|e| !is_none(e))
        .map(|e| annotation_schema(e, source))
        .collect::<Result<Vec<_>, _>>()?;
    match (schemas.len(), has_none) {
        (0, _) => Err("a union needs at least one type besides None".to_owned()),
        (1, false) => Ok(schemas.remove(0)),
        (1, true) => Ok(nullable(schemas.remove(0))),
        (_, has_none) => {
            if has_none {
                schemas.push(json!({ "type": "null" }));
            }
            Ok(json!({ "anyOf": schemas }))
        }
    }
}

/// `T` or null: `{"type": [t, "null"]}` when `T` has a single type, else `anyOf`.
fn nullable(mut schema: Value) -> Value {
    match schema.get("type").and_then(Value::as_str).map(str::to_owned) {
        Some(single) => {
            schema["type"] = json!([single, "null"]);
            schema
        }
        None => json!({ "anyOf": [schema, { "type": "null" }] }),
    }
}

/// `Literal["a", "b"]` as an `enum`, with a `type` when every value has the same one.
fn literal_schema(values: &[&Expr]) -> Result<Value, String> {
    let values = values
        .iter()
        .map(|v| {
            literal_json(v).ok_or_else(|| "Literal[...] takes constants (strings, numbers, booleans, None)".to_owned())
        })
        .collect::<Result<Vec<Value>, String>>()?;
    let type_of = |v: &Value| match v {
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        _ => "null",
    };
    let mut schema = json!({ "enum": values });
    if let Some(first) = values.first().map(type_of)
        && values.iter().all(|v| type_of(v) == first)
    {
        schema["type"] = json!(first);
    }
    Ok(schema)
}

/// A constant expression (string, number, boolean, `None`, a negated number) as JSON.
fn literal_json(expr: &Expr) -> Option<Value> {
    match expr {
        Expr::Constant(constant) => match &constant.value {
            Constant::Str(text) => Some(json!(text)),
            Constant::Bool(flag) => Some(json!(flag)),
            Constant::None => Some(Value::Null),
            Constant::Int(int) => int.to_string().parse::<i64>().ok().map(Value::from),
            Constant::Float(float) => serde_json::Number::from_f64(*float).map(Value::Number),
            _ => None,
        },
        Expr::UnaryOp(ast::ExprUnaryOp {
            op: ast::UnaryOp::USub,
            operand,
            ..
        }) => match literal_json(operand)? {
            Value::Number(n) => n.as_i64().map(|i| json!(-i)).or_else(|| n.as_f64().map(|f| json!(-f))),
            _ => None,
        },
        _ => None,
    }
}

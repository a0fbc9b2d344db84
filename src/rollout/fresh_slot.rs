//! Scoring in a fresh slot, so a policy cannot tamper with its own reward.
//!
//! A reward computed in the trajectory's own slot runs after the model's code, in the same
//! interpreter: a model could replace `sympy.simplify`, `math.isclose` or the functions under
//! test before it is scored. With scoring in a fresh slot, the reward runs in a new slot of the
//! same backend, which gets only what the reward needs:
//! - a math reward needs nothing but the final answer;
//! - code and custom rewards get the trajectory's *definitions*, copied from its `python` code:
//!   top-level `import`s, `def`s and `class`es (decorators included), and assignments to plain
//!   names (`LIMIT = 10`). Every other statement is left out, in particular assignments to
//!   attributes or items (`math.isclose = ...`, `sys.modules[...] = ...`) and calls. Cells that
//!   do not parse as Python are left out whole. Files the model wrote are not copied.
//!
//! This raises the bar, it is not a proof: a definition can still run code when it is made (a
//! decorator, a default value, a class body, a module the model wrote and then imports).

use rustpython_parser::Parse;
use rustpython_parser::ast::{self, Expr, Ranged, Stmt};
use serde_json::Value;

use crate::chat::Message;
use crate::rollout::agent::Step;
use crate::rollout::dataset::Problem;
use crate::rollout::reward::{Reward, score};
use crate::slot::{Backend, BackendError, ErrorKind, ToolCall};

/// What scoring a trajectory in a fresh slot needs from it.
pub struct Scored<'a> {
    /// The trajectory's id; the fresh slot is acquired as `<id>/reward`.
    pub trajectory_id: &'a str,
    /// The problem.
    pub problem: &'a Problem,
    /// The extracted final answer.
    pub answer: Option<&'a str>,
    /// The conversation.
    pub messages: &'a [Message],
    /// The steps, whose `python` code the definitions are copied from.
    pub steps: &'a [Step],
    /// A custom reward function's source.
    pub custom: Option<&'a str>,
    /// The fresh slot's seed, in a seeded rollout.
    pub seed: Option<u64>,
}

/// Why a trajectory could not be scored in a fresh slot. Either way it has no reward: a
/// definition the host failed to run would otherwise show up as the tests' `NameError`, a
/// reward of 0 that the policy did not earn.
#[derive(Debug, thiserror::Error)]
pub enum FreshSlotError {
    /// No slot could be acquired.
    #[error("failed to acquire a fresh slot for the reward")]
    Acquire(#[source] BackendError),
    /// The host failed to run a cell of the trajectory's definitions (not the definitions'
    /// own error, which is the trajectory's to own).
    #[error("the fresh slot for the reward failed to run the trajectory's definitions: {0}")]
    Definitions(String),
}

impl FreshSlotError {
    /// A short name for the summary's `failed_by_kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            FreshSlotError::Acquire(_) => "reward_slot_acquire",
            FreshSlotError::Definitions(_) => "reward_slot_definitions",
        }
    }
}

/// Scores `scored` in a new slot of `backend` holding only the trajectory's definitions (none
/// for a math reward), then releases it. Fails when no slot can be acquired, or when the host
/// (not the code) fails to run the definitions.
pub async fn reward_in_fresh_slot(backend: &dyn Backend, scored: Scored<'_>) -> Result<Reward, FreshSlotError> {
    let trajectory_id = format!("{}/reward", scored.trajectory_id);
    let slot = match scored.seed {
        Some(seed) => backend.acquire_seeded(&trajectory_id, seed).await,
        None => backend.acquire(&trajectory_id).await,
    }
    .map_err(FreshSlotError::Acquire)?;
    if scored.custom.is_some() || !scored.problem.test_cases.is_empty() {
        let cells: Vec<_> = scored
            .steps
            .iter()
            .flat_map(|s| &s.calls)
            .filter_map(|c| python_code(&c.call))
            .map(definitions)
            .filter(|d| !d.is_empty())
            .collect();
        if !cells.is_empty() {
            // A definition that fails in Python (an import the fresh slot lacks) shows up as the
            // tests' NameError, which is the honest outcome; the host failing to run it is not.
            let results = backend
                .execute_batch(
                    cells
                        .into_iter()
                        .map(|code| (slot.clone(), ToolCall::python(code)))
                        .collect(),
                )
                .await;
            if let Some(failed) = results
                .iter()
                .find(|r| r.error.as_ref().is_some_and(|e| host_failure(e.kind)))
            {
                let _ = backend.release(&slot, true).await;
                return Err(FreshSlotError::Definitions(failed.output.trim().to_owned()));
            }
        }
    }
    let mut reward = score(
        backend,
        &slot,
        scored.problem,
        scored.answer,
        scored.messages,
        scored.custom,
    )
    .await;
    reward.fresh_slot = true;
    // The reward is computed; a slot that fails to release does not change it.
    let _ = backend.release(&slot, true).await;
    Ok(reward)
}

/// Whether a call failed because of the host, not the code it ran.
fn host_failure(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Backend | ErrorKind::Remote | ErrorKind::UnknownSlot)
}

/// The code of a `python` call, as the notebook agent and the tools agent record it.
fn python_code(call: &ToolCall) -> Option<&str> {
    (call.name == "python")
        .then(|| call.arguments.get("code").and_then(Value::as_str))
        .flatten()
}

/// The definitions of a Python cell (see the module docs), in order; empty when it has none or
/// does not parse.
pub fn definitions(code: &str) -> String {
    let Ok(suite) = ast::Suite::parse(code, "<cell>") else {
        return String::new();
    };
    let mut kept: Vec<&str> = Vec::new();
    for stmt in &suite {
        let decorators = match stmt {
            Stmt::FunctionDef(def) => Some(&def.decorator_list),
            Stmt::AsyncFunctionDef(def) => Some(&def.decorator_list),
            Stmt::ClassDef(class) => Some(&class.decorator_list),
            Stmt::Import(_) | Stmt::ImportFrom(_) => None,
            Stmt::Assign(assign) if assign.targets.iter().all(binds_names_only) => None,
            Stmt::AnnAssign(assign) if binds_names_only(&assign.target) => None,
            _ => continue,
        };
        let mut start = usize::from(stmt.start());
        // A definition's range starts at `def`/`class`; its decorators come before, each after an `@`.
        if let Some(first) = decorators.and_then(|d| d.first()) {
            start = code[..usize::from(first.start())].rfind('@').unwrap_or(start);
        }
        if let Some(text) = code.get(start..usize::from(stmt.end())) {
            kept.push(text);
        }
    }
    kept.join("\n")
}

/// Whether an assignment target binds plain names only (`x`, `a, b`), not attributes or items.
fn binds_names_only(target: &Expr) -> bool {
    match target {
        Expr::Name(_) => true,
        Expr::Tuple(tuple) => tuple.elts.iter().all(binds_names_only),
        Expr::List(list) => list.elts.iter().all(binds_names_only),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::definitions;

    #[test]
    fn definitions_keep_imports_defs_and_name_assignments_only() {
        let cell = "import math\nfrom functools import cache\nLIMIT: int = 10\na, b = 1, 2\n@cache\ndef f(x):\n    return x * LIMIT\nclass C:\n    pass\n\
                    math.isclose = lambda *a, **k: True\nprint(f(2))\nimport sys; sys.modules['x'] = None\nfor i in range(3):\n    pass\n";
        assert_eq!(
            definitions(cell),
            "import math\nfrom functools import cache\nLIMIT: int = 10\na, b = 1, 2\n@cache\ndef f(x):\n    return x * LIMIT\nclass C:\n    pass\nimport sys"
        );
        assert_eq!(definitions("this is not python ("), "");
    }
}

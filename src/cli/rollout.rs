//! `rollbox rollout`: run agent trajectories over a dataset and write trajectories and a summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use rollbox::rollout::agent::Trajectory;
use rollbox::rollout::code_blocks::CodeTags;
use rollbox::rollout::config::{AgentConfig, AgentKind, RolloutConfig};
use rollbox::rollout::dataset::{Dataset, load_dataset};
use rollbox::rollout::policy::{ChatClient, ChatClientConfig, DEFAULT_MAX_RESPONSE_BYTES, OraclePolicy, Policy};
use rollbox::rollout::replay::{read_trajectory, replay as replay_trajectory};
use rollbox::rollout::runner::{RolloutReporter, StopSignal, run_rollout};
use rollbox::rollout::summary::Summary;
use rollbox::rollout::user_tools::{ToolsFile, ToolsFileError, UserTools};
use rollbox::truncation::{TemplateChoice, TokenCounter};

use super::backend_args::{BackendArgs, BackendChoice};
use super::interrupts::Interrupts;
use super::progress_lines::{ProgressLines, Unit};
use super::{LimitArgs, Printer, RuntimeArgs, SeedArgs};

/// The agent loops, as flags (and as a dataset sidecar names them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum AgentFlag {
    /// Code in <code> blocks, outputs back in <output> tags.
    Notebook,
    /// OpenAI function calling with the backend's tools.
    Tools,
}

#[derive(Args)]
pub(crate) struct RolloutArgs {
    /// The problems, one JSON object per line (instance_id, problem, ground_truth or test_cases,
    /// reference_solution for the oracle). Repeat to run several files as one batch.
    #[arg(long, value_name = "FILE.jsonl", required_unless_present = "replay")]
    dataset: Vec<PathBuf>,
    /// The folder for trajectories.jsonl and summary.json.
    #[arg(long, value_name = "DIR", required_unless_present = "replay")]
    out: Option<PathBuf>,
    /// Replay one trajectory of a seeded rollout instead: its recorded tool calls run again in
    /// a fresh slot with its recorded seed, and the first result that differs is printed (as
    /// JSON on stdout; exit status 1 when one differs). Give the backend flags of the original
    /// run.
    #[arg(long, value_name = "FILE.jsonl", requires = "id", conflicts_with_all = ["dataset", "out", "seed", "resume"])]
    replay: Option<PathBuf>,
    /// The trajectory to replay (`<instance_id>/<sample>`).
    #[arg(long, value_name = "ID", requires = "replay")]
    id: Option<String>,
    /// An OpenAI-compatible server (`http://localhost:8000/v1`); without it the offline oracle
    /// policy plays each problem's reference solution.
    #[arg(long, value_name = "URL")]
    model: Option<String>,
    /// The model name sent with each request.
    #[arg(long, value_name = "NAME", requires = "model", default_value = "default")]
    model_name: String,
    /// The environment variable that holds the server's API key.
    #[arg(long, value_name = "VAR", requires = "model")]
    api_key_env: Option<String>,
    /// The agent loop [default: the dataset sidecar's `agent`, else notebook].
    #[arg(long, value_enum)]
    agent: Option<AgentFlag>,
    /// Trajectories per problem, each in its own slot (G for GRPO).
    #[arg(long, value_name = "G", default_value_t = 1)]
    group_size: usize,
    /// Branch each group after K turns: the first K turns (and the problem's setup_code) run
    /// once per problem, then the slot and the conversation are forked into --group-size
    /// continuations. trajectories.jsonl records the shared prefix in each line's `branch`.
    /// Needs a backend that can fork (wasm, or remote with wasm servers).
    #[arg(long, value_name = "K")]
    branch_after_turn: Option<usize>,
    /// Trajectories running at once (a branched group's samples all run at once, so a group
    /// larger than this runs alone).
    #[arg(long, value_name = "N", default_value_t = 8)]
    concurrency: usize,
    /// Most assistant turns per trajectory.
    #[arg(long, value_name = "T", default_value_t = 8)]
    max_turns: usize,
    /// Skip trajectories already in the output folder's trajectories.jsonl.
    #[arg(long)]
    resume: bool,
    /// Also write every trajectory as a Jupyter notebook into the output folder's notebooks/.
    #[arg(long)]
    notebooks: bool,
    /// The tag that opens a code block in the notebook agent.
    #[arg(long, value_name = "TAG", default_value = "<code>")]
    code_open: String,
    /// The tag that closes a code block in the notebook agent.
    #[arg(long, value_name = "TAG", default_value = "</code>")]
    code_close: String,
    /// The tag name code output is wrapped in (`output` gives <output>...</output>).
    #[arg(long, value_name = "NAME", default_value = "output")]
    output_tag: String,
    /// A file whose text replaces the default system prompt.
    #[arg(long, value_name = "PATH")]
    system_prompt: Option<PathBuf>,
    /// A Python file defining `reward(problem, answer, messages) -> float`, run in each
    /// trajectory's slot in place of the math and code rewards.
    #[arg(long, value_name = "PATH")]
    reward_file: Option<PathBuf>,
    /// The context budget: with --tokenizer, a trajectory stops (stop reason `context_budget`)
    /// when the conversation's exact token count exceeds it before a model turn; without, once
    /// the server reports at least this many tokens in the conversation.
    #[arg(long, value_name = "TOKENS", alias = "max-context-tokens")]
    context_budget: Option<u64>,
    /// The model's folder (tokenizer.json beside tokenizer_config.json) or its tokenizer.json
    /// alone (Hugging Face format), to count the conversation exactly for --context-budget
    /// before every turn (works under the oracle policy too).
    #[arg(long, value_name = "PATH", requires = "context_budget")]
    tokenizer: Option<PathBuf>,
    /// The chat template counted with --tokenizer: `auto` (the model's own Jinja template; the
    /// built-in `qwen` one, with a warning, when it ships none), `qwen` (ChatML), `bare` (none)
    /// or the path of a Jinja template file.
    #[arg(
        long,
        value_name = "auto|qwen|bare|PATH",
        default_value = "auto",
        requires = "tokenizer"
    )]
    chat_template: TemplateChoice,
    /// A Python file of typed, documented functions that become extra tools of the `tools`
    /// agent, run inside each trajectory's slot. Repeat for several files.
    #[arg(long, value_name = "FILE.py")]
    tools_file: Vec<PathBuf>,
    /// Do not offer the built-in `calculator` tool to the `tools` agent.
    #[arg(long)]
    no_calculator: bool,
    /// Compute each reward in a new slot holding only the trajectory's definitions (imports,
    /// functions, classes, plain assignments), so a policy cannot tamper with its scoring. This
    /// is the default; the flag is kept so that existing command lines keep working.
    #[arg(long, conflicts_with = "unsafe_score_in_own_slot")]
    score_in_fresh_slot: bool,
    /// Compute each reward in the trajectory's own slot, after the model's code (faster, and
    /// FORGEABLE: the model's code can change what its scoring cells report; docs/security.md).
    #[arg(long)]
    unsafe_score_in_own_slot: bool,
    /// Model requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_in_flight: usize,
    /// Retries of a model request on 429, 5xx, a failed connection, and a timeout or broken
    /// connection before or while the response body is read (one rule for all of them). A body
    /// past --max-response-bytes, or one that is not a chat completion, is not retried.
    #[arg(long, value_name = "N", default_value_t = 4)]
    retries: u32,
    /// Seconds before one model request times out, reading the whole body included.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    request_timeout: f64,
    /// The largest model response body read, in bytes; reading stops as soon as a body passes
    /// it and the trajectory ends with `model_response_too_large`.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_RESPONSE_BYTES)]
    max_response_bytes: usize,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// Most tokens per model reply.
    #[arg(long, value_name = "N")]
    max_tokens: Option<u32>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    backend: BackendArgs,
    /// Each trajectory's slot gets the seed derived from N, its problem and its sample; a model
    /// server gets that seed with each request (add --temperature 0 for repeatable replies).
    /// summary.json and each trajectory record the seeds.
    #[command(flatten)]
    seed: SeedArgs,
}

impl RolloutArgs {
    fn agent_config(&self) -> anyhow::Result<AgentConfig> {
        anyhow::ensure!(self.max_turns > 0, "--max-turns must be at least 1");
        anyhow::ensure!(
            !self.code_open.is_empty() && !self.code_close.is_empty(),
            "--code-open and --code-close must not be empty"
        );
        let kind = match self.agent {
            Some(AgentFlag::Tools) => AgentKind::Tools,
            Some(AgentFlag::Notebook) | None => AgentKind::Notebook,
        };
        let system_prompt = match &self.system_prompt {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("failed to read the system prompt {}", path.display()))?,
            ),
            None => None,
        };
        Ok(AgentConfig {
            max_turns: self.max_turns,
            code_tags: CodeTags {
                open: self.code_open.clone(),
                close: self.code_close.clone(),
            },
            output_tag: self.output_tag.clone(),
            system_prompt,
            max_context_tokens: self.context_budget,
            token_counter: self.token_counter()?,
            user_tools: self.user_tools(kind)?,
            ..AgentConfig::new(kind)
        })
    }

    /// The tools agent's extra tools (none for the notebook agent).
    fn user_tools(&self, kind: AgentKind) -> anyhow::Result<Arc<UserTools>> {
        if kind != AgentKind::Tools {
            anyhow::ensure!(
                self.tools_file.is_empty(),
                "--tools-file needs --agent tools: the notebook agent does not call functions"
            );
            return Ok(Arc::default());
        }
        Ok(Arc::new(user_tools(!self.no_calculator, &self.tools_file)?))
    }

    fn token_counter(&self) -> anyhow::Result<Option<Arc<TokenCounter>>> {
        let Some(path) = &self.tokenizer else { return Ok(None) };
        let counter = TokenCounter::from_model(path, &self.chat_template)?;
        super::compact::warn_on_fallback(&counter);
        Ok(Some(Arc::new(counter)))
    }

    fn policy(&self) -> anyhow::Result<Arc<dyn Policy>> {
        let Some(url) = &self.model else {
            return Ok(Arc::new(OraclePolicy));
        };
        let api_key = match &self.api_key_env {
            Some(var) => {
                Some(std::env::var(var).with_context(|| format!("--api-key-env names `{var}`, which is not set"))?)
            }
            None => None,
        };
        let request_timeout = Duration::try_from_secs_f64(self.request_timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--request-timeout must be a positive number of seconds"))?;
        anyhow::ensure!(
            self.max_response_bytes > 0,
            "--max-response-bytes must be a positive number of bytes"
        );
        let config = ChatClientConfig {
            api_key,
            max_in_flight: self.max_in_flight.max(1),
            max_retries: self.retries,
            request_timeout,
            max_response_bytes: self.max_response_bytes,
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            ..ChatClientConfig::new(url.clone(), self.model_name.clone())
        };
        Ok(Arc::new(ChatClient::new(config)?))
    }
}

/// The calculator (when asked for), then the tools of every file, parsed here on the host
/// (never run).
pub(crate) fn user_tools(calculator: bool, tools_files: &[PathBuf]) -> anyhow::Result<UserTools> {
    let mut files = Vec::new();
    if calculator {
        files.push(ToolsFile::calculator());
    }
    for path in tools_files {
        files.push(ToolsFile::read(path)?);
    }
    match UserTools::new(files) {
        Err(ToolsFileError::Duplicate { name, .. }) if calculator && name == "calculator" => {
            anyhow::bail!(
                "a tools file defines `calculator`, the name of the built-in calculator; rename yours, or leave the built-in out (rollout --no-calculator)"
            )
        }
        tools => Ok(tools?),
    }
}

/// The problems of the dataset at `path`, each SWE row that names no environment setup or image
/// of its own given the sidecar's (`NAME.rollbox.json`), if it has them.
pub(crate) fn load_dataset_with_sidecar(path: &std::path::Path) -> anyhow::Result<rollbox::rollout::dataset::Dataset> {
    let mut dataset = load_dataset(path)?;
    let Some(needs) = dataset_needs(path)? else {
        return Ok(dataset);
    };
    for task in dataset.problems.iter_mut().filter_map(|p| p.swe.as_mut()) {
        if task.environment_setup.is_empty() {
            task.environment_setup.clone_from(&needs.environment_setup);
        }
        if task.image_name.is_none() {
            task.image_name.clone_from(&needs.image_name);
        }
    }
    Ok(dataset)
}

/// Every file's problems in order, one batch. Unreadable lines are reported with their file
/// and line; an `instance_id` already seen in an earlier file is reported and skipped.
fn load_datasets(paths: &[PathBuf], printer: Printer) -> anyhow::Result<rollbox::rollout::dataset::Dataset> {
    let mut merged = rollbox::rollout::dataset::Dataset::default();
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        let dataset = load_dataset_with_sidecar(path)?;
        for error in &dataset.errors {
            printer.warn(format_args!("{}: skipped {error}", path.display()));
        }
        merged.errors.extend(dataset.errors);
        for problem in dataset.problems {
            if seen.insert(problem.instance_id.clone()) {
                merged.problems.push(problem);
            } else {
                printer.warn(format_args!(
                    "{}: skipped `{}`: its instance_id is already in an earlier dataset",
                    path.display(),
                    problem.instance_id
                ));
            }
        }
    }
    Ok(merged)
}

/// What a dataset says it needs, in a sidecar next to it: `tools.jsonl` has `tools.rollbox.json`
/// (`{"agent": "tools", "tools_files": ["tools.py"], "backend": "process"}`, every field
/// optional). Flags override it.
#[derive(Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetNeeds {
    /// `notebook` or `tools`.
    agent: Option<AgentFlag>,
    /// Files of extra tools for the tools agent, relative to the sidecar's folder.
    #[serde(default)]
    tools_files: Vec<PathBuf>,
    /// `wasm` or `process`.
    backend: Option<BackendChoice>,
    /// The environment setup of every SWE row that names none of its own (`environment_setup`).
    #[serde(default)]
    environment_setup: Vec<String>,
    /// The Modal image of every SWE row that names none of its own (`image_name`).
    image_name: Option<String>,
}

/// The sidecar of the dataset at `path` (`NAME.rollbox.json` beside `NAME.jsonl`), if it has
/// one, with its tools files made relative to the working folder.
fn dataset_needs(path: &std::path::Path) -> anyhow::Result<Option<DatasetNeeds>> {
    let sidecar = path.with_extension("rollbox.json");
    let text = match std::fs::read_to_string(&sidecar) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("failed to read {}", sidecar.display())),
    };
    let mut needs: DatasetNeeds = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a dataset sidecar: it takes `agent` (notebook or tools), `tools_files`, `backend` (wasm or process), and for SWE rows `environment_setup` (a list of commands) and `image_name`",
            sidecar.display()
        )
    })?;
    let base = sidecar.parent().unwrap_or(std::path::Path::new("."));
    needs.tools_files = needs.tools_files.iter().map(|file| base.join(file)).collect();
    Ok(Some(needs))
}

/// Fills the flags a user left out from the datasets' sidecars and rows, saying what it chose:
/// the agent and extra tools files from the sidecars, and the process backend for SWE rows
/// (they need `bash`), unless `--backend` was given. Sidecars that disagree are an error that
/// names the flag to pass.
fn apply_dataset_needs(
    args: &mut RolloutArgs,
    dataset: &Dataset,
    backend_given: bool,
    printer: Printer,
) -> anyhow::Result<()> {
    let mut agent: Option<(AgentFlag, PathBuf)> = None;
    let mut backend: Option<(BackendChoice, PathBuf)> = None;
    let mut tools_files = Vec::new();
    for path in &args.dataset {
        let Some(needs) = dataset_needs(path)? else { continue };
        if let Some(wanted) = needs.agent {
            match &agent {
                Some((chosen, other)) if *chosen != wanted => anyhow::bail!(
                    "the sidecars of {} and {} ask for different agents; pass --agent",
                    other.display(),
                    path.display()
                ),
                _ => agent = Some((wanted, path.clone())),
            }
        }
        if let Some(wanted) = needs.backend {
            match &backend {
                Some((chosen, other)) if *chosen != wanted => anyhow::bail!(
                    "the sidecars of {} and {} ask for different backends; pass --backend",
                    other.display(),
                    path.display()
                ),
                _ => backend = Some((wanted, path.clone())),
            }
        }
        tools_files.extend(needs.tools_files);
    }
    if args.agent.is_none()
        && let Some((wanted, path)) = agent
    {
        let name = format!("{wanted:?}").to_lowercase();
        printer.line(format_args!(
            "agent: {name} (the sidecar of {} asks for it; --agent overrides it)",
            path.display()
        ));
        args.agent = Some(wanted);
    }
    if args.agent == Some(AgentFlag::Tools) {
        for file in tools_files {
            if !args.tools_file.contains(&file) {
                args.tools_file.push(file);
            }
        }
    }
    let swe_rows = dataset.problems.iter().filter(|p| p.swe.is_some()).count();
    let wanted = backend
        .map(|(choice, _)| choice)
        .or((swe_rows > 0).then_some(BackendChoice::Process));
    if !backend_given
        && let Some(wanted) = wanted
        && wanted != args.backend.backend
    {
        printer.line(format_args!(
            "backend: {} (the dataset's {}; --backend overrides it)",
            format!("{wanted:?}").to_lowercase(),
            if swe_rows > 0 {
                "SWE rows need bash"
            } else {
                "sidecar asks for it"
            }
        ));
        args.backend.backend = wanted;
    }
    Ok(())
}

pub(crate) async fn run(mut args: RolloutArgs, backend_given: bool, printer: Printer) -> anyhow::Result<ExitCode> {
    if let (Some(file), Some(id)) = (&args.replay, &args.id) {
        return replay(&args, file, id, printer).await;
    }
    let out = args
        .out
        .clone()
        .context("--out is required: the folder for trajectories.jsonl and summary.json")?;
    anyhow::ensure!(args.group_size > 0, "--group-size must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    check_branching(&args)?;
    let dataset = load_datasets(&args.dataset, printer)?;
    anyhow::ensure!(!dataset.problems.is_empty(), "the dataset has no readable problems");
    apply_dataset_needs(&mut args, &dataset, backend_given, printer)?;
    let agent = args.agent_config()?;
    let policy = args.policy()?;
    check_agent_fits(&dataset, agent.kind, printer);
    let limits = args.limits.resolve()?;
    args.seed.check(&args.runtime)?;
    if super::swe::dry_run(&args.backend, &dataset, &limits, &args.runtime, printer).await? {
        return Ok(ExitCode::SUCCESS);
    }
    super::swe::prepare_for_rollout(&mut args.backend, &dataset, printer).await?;
    let backend = super::swe::start_backend(&args.backend, &dataset, limits, &args.runtime, printer).await?;
    let custom_reward = match &args.reward_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("failed to read the reward file {}", path.display()))?
                .into(),
        ),
        None => None,
    };
    let config = RolloutConfig {
        agent,
        group_size: args.group_size,
        concurrency: args.concurrency,
        out_dir: out,
        resume: args.resume,
        custom_reward,
        score_in_fresh_slot: args.score_in_fresh_slot || !args.unsafe_score_in_own_slot,
        seed: args.seed.seed,
        branch_after_turn: args.branch_after_turn,
    };
    let stop = StopSignal::new();
    let watcher = tokio::spawn(stop_on_interrupt(Interrupts::listen()?, stop.clone(), printer));
    let reporter = ProgressReporter::new(printer);
    let outcome = run_rollout(backend.clone(), policy, &dataset, &config, &reporter, &stop).await;
    watcher.abort();
    reporter.finish();
    // Remote servers (Modal sandboxes included) stop whatever the outcome.
    backend.shutdown().await?;
    let run = outcome?;
    if !printer.is_quiet() {
        print_summary(&run.summary, &run.trajectories_path, &run.summary_path);
    }
    if args.notebooks {
        let dir = config.out_dir.join(super::report::NOTEBOOKS_DIR);
        let written = rollbox::report::RunFiles::load(&run.trajectories_path)?.write_notebooks(&dir, None)?;
        printer.line(format_args!("wrote {} notebooks in {}", written.len(), dir.display()));
    }
    Ok(if run.summary.run.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// Refuses a `--branch-after-turn` that would branch nothing: a group of one, no turn before
/// the branch, or no turn after it.
fn check_branching(args: &RolloutArgs) -> anyhow::Result<()> {
    let Some(after) = args.branch_after_turn else {
        return Ok(());
    };
    anyhow::ensure!(
        args.group_size > 1,
        "--branch-after-turn forks each group into its samples; give --group-size 2 or more"
    );
    anyhow::ensure!(
        after >= 1 && after < args.max_turns,
        "--branch-after-turn {after} must be at least 1 and less than --max-turns ({}): the group shares its first K turns and branches for the rest",
        args.max_turns
    );
    Ok(())
}

/// Warns about problems whose reference solutions call tools, played by the notebook agent:
/// under the oracle they score 0 for certain. A warning, not an error: a run can mean it (a
/// context-budget check that stops before any turn).
fn check_agent_fits(dataset: &Dataset, agent: AgentKind, printer: Printer) {
    let calling = dataset.problems_calling_tools();
    if agent != AgentKind::Notebook || calling.is_empty() {
        return;
    }
    let what = format!(
        "{} of the {} problems (first `{}`) call tools in <tool_call> blocks, which the notebook agent \
         ignores; run them with --agent tools, and --tools-file FILE.py for functions other than the \
         built-in calculator (examples/tools.jsonl needs --tools-file examples/tools.py)",
        calling.len(),
        dataset.problems.len(),
        calling[0]
    );
    printer.warn(what);
}

/// `rollout --replay FILE --id T`: replays trajectory `T` and prints the report as JSON.
async fn replay(args: &RolloutArgs, file: &std::path::Path, id: &str, printer: Printer) -> anyhow::Result<ExitCode> {
    let trajectory = read_trajectory(file, id)?;
    let limits = args.limits.resolve()?;
    let backend = args.backend.start(limits, &args.runtime, printer).await?;
    let outcome = replay_trajectory(backend.as_ref(), &trajectory).await;
    backend.shutdown().await?;
    let report = outcome?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    match &report.divergence {
        None => {
            printer.line(format_args!(
                "replay: all {} calls of `{id}` gave their recorded results",
                report.calls_compared
            ));
            Ok(ExitCode::SUCCESS)
        }
        Some(divergence) => {
            printer.line(format_args!(
                "replay: `{id}` diverged at turn {}, call {} ({})",
                divergence.turn, divergence.call, divergence.tool
            ));
            Ok(ExitCode::from(1))
        }
    }
}

/// The first Ctrl-C (or SIGTERM) stops new trajectories and abandons running ones at their next
/// turn; a second one exits at once (everything finished is already on disk).
async fn stop_on_interrupt(interrupts: Interrupts, stop: StopSignal, printer: Printer) {
    interrupts
        .first(
            printer,
            "\ninterrupted: starting no new trajectories; finished ones are saved (Ctrl-C again to exit now)",
        )
        .await;
    stop.stop();
}

/// A progress bar of trajectories with the running mean reward; on a stderr that is not a
/// terminal, a line every few seconds instead (done/total, mean reward, rate, time).
struct ProgressReporter {
    bar: ProgressBar,
    rewards: std::sync::Mutex<(f64, usize)>,
    /// Set when progress goes out as lines: the step, and how many trajectories ended.
    lines: Option<std::sync::Mutex<(Option<ProgressLines>, u64)>>,
}

impl ProgressReporter {
    fn new(printer: Printer) -> Self {
        let bar = ProgressBar::hidden();
        if printer.draws_progress() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_style(
            ProgressStyle::with_template("{spinner} rollout [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        ProgressReporter {
            bar,
            rewards: std::sync::Mutex::new((0.0, 0)),
            lines: printer
                .prints_progress_lines()
                .then(|| std::sync::Mutex::new((None, 0))),
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
        if let Some(lines) = &self.lines {
            let lines = lines.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(step) = &lines.0 {
                eprintln!("{}", step.last_line(Instant::now()));
            }
        }
    }

    /// Prints `text` above the bar, or as a line of its own when there is no bar (stderr is not
    /// a terminal, where the hidden bar would drop it).
    fn say(&self, text: String) {
        match &self.lines {
            Some(_) => eprintln!("{text}"),
            None => self.bar.println(text),
        }
    }

    /// Counts one ended trajectory and prints a line when one is due.
    fn line(&self, mean_reward: Option<f64>) {
        let Some(lines) = &self.lines else { return };
        let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.1 += 1;
        let done = lines.1;
        let Some(step) = lines.0.as_mut() else { return };
        let now = Instant::now();
        let rate = done as f64 / now.duration_since(step.started()).as_secs_f64().max(1e-3);
        let reward = mean_reward.map_or(String::new(), |r| format!("mean reward {r:.3}, "));
        let detail = format!("{reward}{rate:.2} trajectories/s");
        if let Some(line) = step.progress(done, now, Unit::Count, &detail) {
            eprintln!("{line}");
        }
    }
}

impl RolloutReporter for ProgressReporter {
    fn on_start(&self, to_run: usize, skipped: usize) {
        self.bar.set_length(to_run as u64);
        if let Some(lines) = &self.lines {
            let step = ProgressLines::start("rollout", Some(to_run as u64), Instant::now());
            eprintln!("{}", step.first_line(Unit::Count));
            lines.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(step);
        }
        if skipped > 0 {
            self.say(format!("resuming: {skipped} trajectories already done"));
        }
    }

    fn on_trajectory(&self, trajectory: &Trajectory) {
        let mut rewards = self.rewards.lock().unwrap_or_else(|p| p.into_inner());
        rewards.0 += trajectory.reward.score;
        rewards.1 += 1;
        let mean = rewards.0 / rewards.1 as f64;
        drop(rewards);
        self.bar.set_message(format!("mean reward {mean:.3}"));
        self.bar.inc(1);
        self.line(Some(mean));
    }

    fn on_trajectory_failed(&self, trajectory_id: &str, message: &str) {
        self.say(format!(
            "warning: trajectory {trajectory_id} failed and was not written: {message}"
        ));
        self.bar.inc(1);
        self.line(None);
    }
}

fn print_summary(summary: &Summary, trajectories: &std::path::Path, summary_path: &std::path::Path) {
    if summary.oracle_policy {
        eprintln!(
            "policy: oracle (reference solutions, no model): these numbers check the environment and rewards, not a model"
        );
    } else {
        eprintln!("policy: {}", summary.policy);
    }
    eprintln!(
        "agent: {}   problems: {}   group size: {}   trajectories: {}",
        summary.agent, summary.problems, summary.group_size, summary.trajectories
    );
    let passes: Vec<String> = summary.pass_at_k.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
    eprintln!("mean reward: {:.3}   {}", summary.mean_reward, passes.join("   "));
    eprintln!(
        "turns per trajectory: mean {:.2}, max {}",
        summary.mean_turns, summary.max_turns
    );
    eprintln!(
        "time: model {:.2} s, tools {:.2} s ({:.2} ms per turn), rewards {:.2} s",
        summary.model_seconds, summary.tool_seconds, summary.tool_ms_per_turn, summary.reward_seconds
    );
    eprintln!(
        "engine overhead per turn (excluding model, cells, acquire, scoring and writing): median {:.3} ms over \
         turns that ran code, {:.3} ms over all turns",
        summary.median_overhead_ms_per_turn_with_code, summary.median_overhead_ms_per_turn
    );
    let run = &summary.run;
    eprintln!(
        "this run: {} written, {} skipped (resume), {:.2} trajectories/s over {:.2} s",
        run.written, run.skipped, summary.trajectories_per_second, run.wall_seconds
    );
    if run.groups_forked > 0 {
        let shared = match summary.branch_after_turn {
            Some(k) => format!("its setup and first {k} turns"),
            None => "its setup_code".to_owned(),
        };
        eprintln!(
            "branching: {} groups each ran {shared} once, then forked into their samples",
            run.groups_forked
        );
    }
    if run.interrupted {
        eprintln!(
            "interrupted: {} abandoned, {} not started; rerun with --resume to finish",
            run.abandoned, run.not_started
        );
    }
    let reasons: Vec<String> = summary.stop_reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!("stop reasons: {}", reasons.join(", "));
    if !summary.errors_by_kind.is_empty() {
        let errors: Vec<String> = summary.errors_by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
        eprintln!("errors: {}", errors.join(", "));
    }
    if !summary.dataset_errors.is_empty() {
        eprintln!(
            "dataset: {} lines skipped (see summary.json)",
            summary.dataset_errors.len()
        );
    }
    eprintln!("wrote {} and {}", trajectories.display(), summary_path.display());
}

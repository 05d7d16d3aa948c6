//! The `haic-pipe` binary: parses arguments and wires the engine (`pipeline`)
//! to the stage kinds (`stages`). No logic of its own beyond rendering.

mod eval;
mod html;
mod render;
mod report;
mod serve;
mod ui;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use pipeline::registry::{self, RunStatus};
use pipeline::run::{RunOptions, run};
use pipeline::stage::Kinds;
use pipeline::status::Freshness;
use pipeline::workspace::Workspace;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "haic-pipe",
    version,
    about = "Train and sample hierarchical autoregressive image models as a cached, resumable pipeline"
)]
struct Cli {
    /// The workspace folder (registry, artifacts, logs). Default: `.haic/` beside the pipeline file.
    #[arg(long, global = true, env = "HAIC_WORKSPACE")]
    workspace: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline: cached stages are reused, stale ones run.
    Run {
        pipeline: PathBuf,
        /// Run only these stages and what they need.
        stages: Vec<String>,
        /// Continue the newest unfinished run of this pipeline under its run id.
        #[arg(long)]
        resume: bool,
        /// CPU worker slots.
        #[arg(long, short, default_value_t = default_jobs())]
        jobs: u32,
        /// GPU devices to hand out as slots, e.g. `cuda:0,cuda:1` (default:
        /// CUDA_VISIBLE_DEVICES, else every GPU the CUDA driver sees).
        #[arg(long, value_delimiter = ',')]
        gpus: Vec<String>,
        /// Where stages run: `local` worker processes or `slurm` jobs
        /// (default: the pipeline's `executor.kind`, else local).
        #[arg(long, value_enum)]
        executor: Option<ExecutorArg>,
        /// Stop everything at the first failure (default: keep going).
        #[arg(long, conflicts_with = "keep_going")]
        fail_fast: bool,
        /// Run independent branches on after a failure (the default).
        #[arg(long)]
        keep_going: bool,
        /// Wait for another run on this workspace instead of failing.
        #[arg(long)]
        wait: bool,
        /// Print events as JSON lines.
        #[arg(long)]
        json: bool,
        /// Without a terminal: a stage's progress at most once per this
        /// many seconds (0: every step).
        #[arg(long, default_value_t = 10.0)]
        progress_interval: f64,
        /// Without a terminal: no progress lines, only stage and run events.
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        set: SetArgs,
        /// A name for the run, unique in the workspace (usable where a run id is).
        #[arg(long)]
        name: Option<String>,
        /// A tag for the run (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A note kept with the run.
        #[arg(long)]
        note: Option<String>,
    },
    /// Per stage: cached, stale (and why), running or failed.
    Status {
        pipeline: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        set: SetArgs,
    },
    /// Where a stage's artifact is, and its recent runs.
    Show {
        pipeline: PathBuf,
        stage: String,
        #[command(flatten)]
        set: SetArgs,
    },
    /// Query the experiment registry.
    Registry {
        #[command(subcommand)]
        command: RegistryCmd,
        /// Find the workspace beside this pipeline file.
        #[arg(long, short, global = true)]
        pipeline: Option<PathBuf>,
    },
    /// Remove artifacts that no recent run used.
    Gc {
        /// Find the workspace beside this pipeline file.
        pipeline: Option<PathBuf>,
        /// Keep what the newest N runs produced or read.
        #[arg(long, default_value_t = 10)]
        keep_runs: i64,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Data sets: `data fetch NAME` downloads a well-known one.
    Data {
        #[command(subcommand)]
        command: DataCmd,
    },
    /// Human evaluation of a package a `human_eval_export` stage wrote.
    Eval {
        #[command(subcommand)]
        command: EvalCmd,
        /// Find the workspace beside this pipeline file (default: the
        /// workspace the package lies in, or `.haic`).
        #[arg(long, short, global = true)]
        pipeline: Option<PathBuf>,
    },
    /// Runs side by side: the params that differ, their metrics, and (over
    /// runs that differ only in seeds) means with 95 % intervals.
    Compare {
        /// Run ids or names (`haic-pipe registry runs` lists them); a sweep
        /// run gives one row per member.
        #[arg(required = true)]
        runs: Vec<String>,
        /// A metric to show: `val.bits_per_dim` (every stage that has it) or
        /// `STAGE:METRIC`, `*` for any text (repeatable; default: each
        /// kind's headline metrics).
        #[arg(long = "metric")]
        metrics: Vec<String>,
        /// Pool runs by these params (`STAGE.PARAM` or its end, e.g.
        /// `decoder.kind`; default: every param that differs, except seeds).
        #[arg(long = "group-by")]
        group_by: Vec<String>,
        /// Find the workspace beside this pipeline file.
        #[arg(long, short)]
        pipeline: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Write a run's report: a static HTML page with its curves, tables,
    /// sample grids and timeline.
    Report {
        /// The run id or name (`haic-pipe registry runs` lists them); with
        /// several runs, a page that compares them (a sweep's run gets
        /// its members compared on `compare.html` beside its page).
        #[arg(required = true)]
        runs: Vec<String>,
        /// A metric the comparison shows and overlays (as in `compare`;
        /// default: each kind's headline metrics, `train.loss` and
        /// `train.bits_per_dim`).
        #[arg(long = "metric")]
        metrics: Vec<String>,
        /// Find the workspace beside this pipeline file.
        #[arg(long, short)]
        pipeline: Option<PathBuf>,
        /// The folder to write (default: reports/run-RUN, or
        /// reports/compare-RUN-RUN..., in the workspace).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// A live dashboard over the workspace's registry in the browser:
    /// runs, a run's stages and curves, comparisons. Read-only.
    Ui {
        /// Find the workspace beside this pipeline file.
        #[arg(long, short)]
        pipeline: Option<PathBuf>,
        /// Address to listen on; anything but loopback exposes the
        /// dashboard (and every artifact it lists) to the network.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0: any free one; the address is printed).
        #[arg(long, default_value_t = 8766)]
        port: u16,
    },
    /// Run one stage job (started by the driver or a cluster back-end).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        job: PathBuf,
    },
}

/// `-S PATH=VALUE`: the pipeline with a var or a stage's param replaced.
#[derive(clap::Args)]
struct SetArgs {
    /// Set a var or param for this command: `-S vars.seed=3`,
    /// `-S vq1.quantiser.codebook_size=64` (VALUE is YAML; repeatable).
    #[arg(short = 'S', long = "set", value_name = "PATH=VALUE")]
    set: Vec<pipeline::spec::Override>,
    /// Run the pipeline once per combination of these vars' values, as
    /// one DAG whose shared stages run once: `--sweep seed=0,1,2`
    /// (repeatable; replaces the file's `sweep:`).
    #[arg(long = "sweep", value_name = "NAME=V1,V2,...")]
    sweep: Vec<pipeline::spec::SweepArg>,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Download mnist, fashion-mnist or cifar10, checksummed, resumable.
    Fetch {
        name: String,
        /// Where the files go (default: data/NAME).
        #[arg(long)]
        dest: Option<PathBuf>,
        /// Fetch the same file names from this base URL instead.
        #[arg(long)]
        mirror: Option<String>,
        /// A JSON catalogue of data sets to use instead of the built-in one.
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Serve the local rating page; answers go to the registry.
    Serve {
        /// The package folder (`haic-pipe show PIPELINE STAGE` prints it).
        package: PathBuf,
        /// Address to listen on; anything but loopback exposes the page.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0: any free one; the page's address is printed).
        #[arg(long, default_value_t = 8765)]
        port: u16,
    },
    /// Store the answers of a crowd platform's results CSV
    /// (columns Input.task_id, Answer.choice, WorkerId).
    Import {
        results: PathBuf,
        /// The package the tasks came from.
        #[arg(long)]
        package: PathBuf,
    },
    /// Write the package's tasks CSV for images hosted at another URL.
    Tasks {
        package: PathBuf,
        /// Prefix of the image URLs (the package's `images/` is appended).
        #[arg(long)]
        base_url: String,
        /// Where to write it (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Preference rates per comparison: 95% Wilson intervals and a
    /// two-sided binomial test; raters who failed a catch trial excluded.
    Report,
}

#[derive(Subcommand)]
enum RegistryCmd {
    /// Run one read-only SQL statement.
    Query {
        sql: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Stop the query after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Print at most this many rows.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Every table and view: columns, types and what each holds.
    Schema {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Rebuild a lost or damaged registry from the artifact store: one
    /// run holding every artifact, its params, lineage and metric points.
    /// The old file is renamed aside, never deleted.
    Recover {
        /// Replace a registry that opens and passes its integrity check.
        #[arg(long)]
        force: bool,
    },
    /// The runs, newest first, with stage counts.
    Runs {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExecutorArg {
    Local,
    Slurm,
}

impl From<ExecutorArg> for pipeline::spec::ExecutorKind {
    fn from(e: ExecutorArg) -> Self {
        match e {
            ExecutorArg::Local => pipeline::spec::ExecutorKind::Local,
            ExecutorArg::Slurm => pipeline::spec::ExecutorKind::Slurm,
        }
    }
}

fn default_jobs() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

fn main() {
    stages::tuning::apply();
    let cli = Cli::parse();
    if let Cmd::Worker { job } = &cli.command {
        std::process::exit(worker(job));
    }
    if !matches!(cli.command, Cmd::Run { .. }) {
        // A reader that closes the pipe early (`registry query ... | head`)
        // ends a read-side command quietly, as it ends `cat`, instead of a
        // panic on the failed print. `run` keeps Rust's default (it has
        // workers and the registry to settle).
        // SAFETY: setting a signal's disposition to the default before any
        // other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("haic-pipe: starting the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("haic-pipe: {e:#}");
            2
        }
    };
    // Do not wait for lingering tasks (a blocked stdin reader, a slow drop).
    rt.shutdown_background();
    std::process::exit(code);
}

fn worker(job: &Path) -> i32 {
    let kinds = stages::all();
    match pipeline::stage::read_job(job) {
        Ok(job) => pipeline::stage::run_job(&kinds, job, Box::new(std::io::stdout())),
        Err(e) => {
            eprintln!("haic-pipe worker: {e}");
            2
        }
    }
}

fn load(pipeline: &Path, kinds: &Kinds, set: &SetArgs) -> Result<pipeline::spec::Pipeline> {
    Ok(pipeline::spec::load_with(
        pipeline, kinds, &set.set, &set.sweep,
    )?)
}

/// `STAGE:METRIC` for each headline metric of each stage's kind in `runs`.
fn headline_patterns(runs: &[registry::RunFacts], kinds: &Kinds) -> Vec<String> {
    let stages: std::collections::BTreeSet<(&str, &str)> = runs
        .iter()
        .flat_map(|r| {
            r.metrics
                .iter()
                .map(|(s, k, _, _)| (s.as_str(), k.as_str()))
        })
        .collect();
    stages
        .into_iter()
        .filter_map(|(stage, kind)| Some((stage, kinds.get(kind)?.headline_metrics())))
        .flat_map(|(stage, ms)| ms.iter().map(move |m| format!("{stage}:{m}")))
        .collect()
}

/// The ids of the runs a person named (ids or names); an error names the
/// first that is not there.
async fn run_ids(reader: &mut registry::Reader, runs: &[String]) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(runs.len());
    for which in runs {
        let Some(id) = reader.find_run(which).await? else {
            bail!(
                "no run {which} in this workspace; `haic-pipe registry runs` lists the runs (by id and name)"
            );
        };
        ids.push(id);
    }
    Ok(ids)
}

/// What the runs ran with and gave; a sweep's run gives its members.
async fn facts_of(reader: &mut registry::Reader, ids: &[i64]) -> Result<Vec<registry::RunFacts>> {
    let mut facts = Vec::new();
    for &id in ids {
        match reader.sweep_facts(id).await? {
            Some(members) => facts.extend(members),
            None => facts.extend(reader.run_facts(id).await?),
        }
    }
    Ok(facts)
}

fn workspace_for(cli_ws: &Option<PathBuf>, pipeline: Option<&Path>) -> Result<Workspace> {
    match pipeline {
        Some(p) => Ok(Workspace::locate(p, cli_ws.as_deref())?),
        None => match cli_ws {
            Some(root) => Ok(Workspace::open(
                std::path::absolute(root).context("resolving the workspace path")?,
            )?),
            None => Ok(Workspace::find(
                &std::env::current_dir().context("reading the current folder")?,
            )?),
        },
    }
}

async fn dispatch(cli: Cli) -> Result<i32> {
    let kinds = Arc::new(stages::all());
    match cli.command {
        Cmd::Run {
            pipeline,
            stages,
            resume,
            jobs,
            gpus,
            executor,
            fail_fast,
            keep_going: _,
            wait,
            json,
            progress_interval,
            quiet,
            set,
            name,
            tags,
            note,
        } => {
            if !(progress_interval >= 0.0 && progress_interval.is_finite()) {
                bail!("--progress-interval {progress_interval}: give seconds, 0 or more");
            }
            let label = registry::RunLabel {
                name,
                tags,
                note,
                overrides: set.set.iter().map(|o| o.text.clone()).collect(),
            };
            let p = load(&pipeline, &kinds, &set)?;
            let ws = Workspace::locate(&pipeline, cli.workspace.as_deref())?;
            let mode = if json {
                render::Mode::Json
            } else if std::io::stderr().is_terminal() {
                render::Mode::Tty
            } else {
                render::Mode::Plain
            };
            let sink = render::sink(
                mode,
                render::ProgressLines {
                    every: std::time::Duration::from_secs_f64(progress_interval),
                    quiet,
                },
            );
            let cancel = CancellationToken::new();
            spawn_signal_handler(cancel.clone());
            let opts = RunOptions {
                targets: stages,
                resume,
                jobs,
                gpu_devices: if gpus.is_empty() {
                    pipeline::executor::gpus::visible_gpus()
                } else {
                    gpus
                },
                fail_fast,
                wait_lock: wait,
                executor: executor.map(Into::into),
                label,
            };
            let summary = run(p, kinds, ws, opts, sink.clone(), cancel).await?;
            render::finish(mode);
            Ok(match summary.status {
                RunStatus::Succeeded => 0,
                RunStatus::Interrupted => 130,
                RunStatus::Running | RunStatus::Failed => 1,
            })
        }
        Cmd::Status {
            pipeline,
            json,
            set,
        } => {
            let p = load(&pipeline, &kinds, &set)?;
            let g = pipeline::graph::build(&p)?;
            let ws = Workspace::locate(&pipeline, cli.workspace.as_deref())?;
            let states = pipeline::status::status(&p, &g, &kinds, &ws).await?;
            render::status(&states, json);
            if let (Some(sweep), false) = (&p.sweep, json) {
                render::sweep_members(sweep, &states);
            }
            Ok(if states.iter().all(|s| s.state == Freshness::Cached) {
                0
            } else {
                1
            })
        }
        Cmd::Show {
            pipeline,
            stage,
            set,
        } => {
            let p = load(&pipeline, &kinds, &set)?;
            // A name from the file shows each of its fan-out and sweep copies.
            let shown: Vec<&str> = match p.stage(&stage) {
                Some(s) => vec![s.name.as_str()],
                None => p
                    .stages
                    .iter()
                    .filter(|s| s.answers_to(&stage))
                    .map(|s| s.name.as_str())
                    .collect(),
            };
            if shown.is_empty() {
                bail!(
                    "{}: there is no stage `{stage}`; {}",
                    pipeline.display(),
                    pipeline::graph::did_you_mean(
                        &stage,
                        p.stages.iter().map(|s| s.name.as_str()),
                        "stages in this file"
                    )
                );
            }
            let g = pipeline::graph::build(&p)?;
            let ws = Workspace::locate(&pipeline, cli.workspace.as_deref())?;
            let states = pipeline::status::status(&p, &g, &kinds, &ws).await?;
            for (i, name) in shown.iter().enumerate() {
                let state = states
                    .iter()
                    .find(|s| s.stage == *name)
                    .context("stage missing from status")?;
                if i > 0 {
                    println!();
                }
                render::show(state, &ws, &p).await?;
            }
            Ok(0)
        }
        Cmd::Registry { command, pipeline } => {
            let ws = workspace_for(&cli.workspace, pipeline.as_deref())?;
            let path = ws.registry_path();
            let (result, format) = match command {
                RegistryCmd::Query {
                    sql,
                    format,
                    timeout,
                    limit,
                } => {
                    if !(timeout > 0.0 && timeout.is_finite()) {
                        bail!("--timeout {timeout}: give a positive number of seconds");
                    }
                    let limits = registry::QueryLimits {
                        timeout: std::time::Duration::from_secs_f64(timeout),
                        max_rows: limit,
                    };
                    let q = registry::query_read_only(&path, &sql, &limits).await?;
                    if q.truncated {
                        render::table(&q.result, format);
                        eprintln!(
                            "haic-pipe: the query gives more than {limit} rows; these are the first {limit}: narrow it (WHERE, LIMIT) or give `--limit ROWS`"
                        );
                        return Ok(2);
                    }
                    (q.result, format)
                }
                RegistryCmd::Schema { format } => {
                    (registry::Reader::open(&path).await?.schema().await?, format)
                }
                RegistryCmd::Recover { force } => {
                    let r = pipeline::recover::recover(&ws, pipeline.as_deref(), force).await?;
                    render::recovered(&r, &path);
                    return Ok(0);
                }
                RegistryCmd::Runs { limit, format } => (
                    registry::Reader::open(&path)
                        .await?
                        .runs_overview(limit)
                        .await?,
                    format,
                ),
            };
            render::table(&result, format);
            Ok(0)
        }
        Cmd::Gc {
            pipeline,
            keep_runs,
            dry_run,
        } => {
            let ws = workspace_for(&cli.workspace, pipeline.as_deref())?;
            let verb = if dry_run { "would remove" } else { "removed" };
            let removed = pipeline::gc::collect(&ws, keep_runs, dry_run, |c| {
                println!("{verb} {} ({} bytes)", c.key, c.bytes)
            })
            .await?;
            let bytes: u64 = removed.iter().map(|c| c.bytes).sum();
            eprintln!("{verb} {} artifact(s), {bytes} bytes", removed.len());
            Ok(0)
        }
        Cmd::Data {
            command:
                DataCmd::Fetch {
                    name,
                    dest,
                    mirror,
                    catalog,
                },
        } => {
            let set = stages::data::fetch::find(&name, catalog.as_deref())?;
            let dest = dest.unwrap_or_else(|| PathBuf::from("data").join(&name));
            eprintln!("fetching {name} ({}) into {}", set.licence, dest.display());
            tokio::task::spawn_blocking(move || {
                stages::data::fetch::fetch(&set, &dest, mirror.as_deref(), &mut |line| {
                    eprintln!("  {line}")
                })
            })
            .await
            .context("the download task stopped")??;
            Ok(0)
        }
        Cmd::Compare {
            runs,
            metrics,
            group_by,
            pipeline,
            format,
        } => {
            let ws = workspace_for(&cli.workspace, pipeline.as_deref())?;
            let mut reader = registry::Reader::open(&ws.registry_path()).await?;
            let ids = run_ids(&mut reader, &runs).await?;
            let facts = facts_of(&mut reader, &ids).await?;
            let patterns = if metrics.is_empty() {
                headline_patterns(&facts, &kinds)
            } else {
                metrics
            };
            let group_by = match group_by.is_empty() {
                true => pipeline::compare::GroupBy::VaryingExceptSeeds,
                false => pipeline::compare::GroupBy::Params(group_by),
            };
            let c = pipeline::compare::compare(&facts, &patterns, &group_by);
            render::comparison(&c, format);
            Ok(0)
        }
        Cmd::Ui {
            pipeline,
            host,
            port,
        } => {
            let ws = workspace_for(&cli.workspace, pipeline.as_deref())?;
            ui::serve(&ws, kinds, &host, port).await?;
            Ok(0)
        }
        Cmd::Report {
            runs,
            metrics,
            pipeline,
            out,
        } => {
            let ws = workspace_for(&cli.workspace, pipeline.as_deref())?;
            let registry_path = ws.registry_path();
            let mut reader = registry::Reader::open(&registry_path).await?;
            let ids = run_ids(&mut reader, &runs).await?;
            let mut facts = facts_of(&mut reader, &ids).await?;
            reader.load_producers(&mut facts).await?;
            let patterns = match metrics.is_empty() {
                true => {
                    let mut p = headline_patterns(&facts, &kinds);
                    p.extend(["train.loss".into(), "train.bits_per_dim".into()]);
                    p
                }
                false => metrics,
            };
            let page = match ids.as_slice() {
                [run] => {
                    let out =
                        out.unwrap_or_else(|| ws.root.join("reports").join(format!("run-{run}")));
                    // A sweep's members side by side, linked from its page.
                    let compared = facts.len() > 1;
                    if compared {
                        report::write_comparison(
                            &registry_path,
                            &facts,
                            &patterns,
                            &out,
                            "compare.html",
                        )
                        .await?;
                    }
                    report::write(
                        &registry_path,
                        *run,
                        &out,
                        compared.then_some("compare.html"),
                    )
                    .await?
                }
                _ => {
                    let name = match ids.len() <= 10 {
                        true => ids.iter().map(i64::to_string).collect::<Vec<_>>().join("-"),
                        false => format!("{}-and-{}-more", ids[0], ids.len() - 1),
                    };
                    let out = out
                        .unwrap_or_else(|| ws.root.join("reports").join(format!("compare-{name}")));
                    report::write_comparison(&registry_path, &facts, &patterns, &out, "index.html")
                        .await?
                }
            };
            println!("{}", page.display());
            Ok(0)
        }
        Cmd::Eval { command, pipeline } => {
            let registry = |package: Option<&Path>| -> Result<PathBuf> {
                if cli.workspace.is_some() || pipeline.is_some() {
                    return Ok(workspace_for(&cli.workspace, pipeline.as_deref())?.registry_path());
                }
                if let Some(found) = package.and_then(eval::registry_above) {
                    return Ok(found);
                }
                Ok(workspace_for(&None, None)?.registry_path())
            };
            match command {
                EvalCmd::Serve {
                    package,
                    host,
                    port,
                } => {
                    let p = eval::Package::open(&package)?;
                    eval::serve(&registry(Some(&package))?, p, &host, port).await?;
                }
                EvalCmd::Import { results, package } => {
                    let p = eval::Package::open(&package)?;
                    let (rows, added) =
                        eval::import(&registry(Some(&package))?, &p, &results).await?;
                    println!(
                        "{rows} answers read from {}, {added} new (the others were stored already)",
                        results.display()
                    );
                }
                EvalCmd::Tasks {
                    package,
                    base_url,
                    out,
                } => {
                    let manifest = eval::Package::open(&package)?.manifest;
                    let csv = stages::human_eval::tasks_csv(&manifest, &base_url)?;
                    match out {
                        Some(path) => std::fs::write(&path, csv)
                            .with_context(|| format!("writing {}", path.display()))?,
                        None => std::io::Write::write_all(&mut std::io::stdout(), &csv)?,
                    }
                }
                EvalCmd::Report => {
                    let outcomes = eval::outcomes(&registry(None)?).await?;
                    print!("{}", eval::render_report(&outcomes));
                }
            }
            Ok(0)
        }
        Cmd::Worker { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// Ctrl-C or SIGTERM: stop running workers, record them interrupted, exit 130.
fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!(
            "haic-pipe: stopping; running stages are recorded as interrupted (resume with --resume)"
        );
        cancel.cancel();
    });
}

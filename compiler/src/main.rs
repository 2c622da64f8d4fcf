//! `trireme`: compile Kubernetes network policies into a portable ruleset
//! and answer reachability questions offline.

use clap::{Parser, Subcommand, ValueEnum};
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use trireme_compiler::cluster::{Cluster, Workload};
use trireme_compiler::eval::{Endpoint, Flow};
use trireme_compiler::model::Protocol;
use trireme_compiler::plugins::{self, Plugins};
use trireme_compiler::ruleset::Ruleset;
use trireme_compiler::{compile, explain, matrix, source};

/// WASM plugins to embed (compile) or to use with policies from -f.
#[derive(clap::Args, Clone, Default)]
struct PluginArgs {
    /// Embed a plugin: NAME=FILE.wasm (repeatable); rule files `ask NAME`.
    #[arg(long = "plugin", value_name = "NAME=FILE")]
    plugins: Vec<String>,
    /// Settings for a plugin's trireme_init: NAME=FILE (JSON or YAML).
    #[arg(long = "plugin-config", value_name = "NAME=FILE")]
    configs: Vec<String>,
    /// UNSAFE: when NAME fails, abstain / keep the workload's own labels
    /// instead of denying.
    #[arg(long = "plugin-fail-open", value_name = "NAME")]
    fail_open: Vec<String>,
}

impl PluginArgs {
    fn is_empty(&self) -> bool {
        self.plugins.is_empty() && self.configs.is_empty() && self.fail_open.is_empty()
    }
}

#[derive(Parser)]
#[command(
    name = "trireme",
    version,
    about = "Identity-based network policy: compile and query offline"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile policies into a ruleset file.
    Compile {
        /// Input file or directory (repeatable; YAML, multi-document, kind: List).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Where to write the compiled ruleset.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Treat lint warnings (rule-language files) as errors.
        #[arg(long)]
        deny_warnings: bool,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Print rule-language files (`.trireme`) in canonical form.
    Fmt {
        files: Vec<PathBuf>,
        /// Rewrite the files in place.
        #[arg(short, long)]
        write: bool,
        /// Exit 1 if a file is not in canonical form (for CI).
        #[arg(long)]
        check: bool,
    },
    /// May one workload reach another? Exit 0 allowed, 1 denied, 2 error.
    Check {
        /// Cluster snapshot and (without --ruleset) policies.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// A compiled ruleset to evaluate instead of policies from -f.
        #[arg(long)]
        ruleset: Option<PathBuf>,
        /// Source: NS/POD, or an IP address for a non-workload peer.
        #[arg(long)]
        from: String,
        /// Destination: NS/POD, or an IP address for a non-workload peer.
        #[arg(long)]
        to: String,
        /// PORT[/PROTOCOL], protocol TCP (default), UDP or SCTP.
        #[arg(long, value_parser = parse_port)]
        port: (u16, Protocol),
        /// Walk the decision tier by tier and rule by rule (= `trireme explain`).
        #[arg(short, long)]
        verbose: bool,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// `check -v`: why a connection is allowed or denied, rule by rule.
    Explain {
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        #[arg(long)]
        ruleset: Option<PathBuf>,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, value_parser = parse_port)]
        port: (u16, Protocol),
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Reachability of every ordered pair of pods in the snapshot.
    Matrix {
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        #[arg(long)]
        ruleset: Option<PathBuf>,
        /// PORT[/PROTOCOL] (repeatable).
        #[arg(long = "port", value_parser = parse_port, required = true)]
        ports: Vec<(u16, Protocol)>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
        output: Format,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Print a compiled ruleset in readable form.
    Inspect { ruleset: PathBuf },
    /// Run policy test files (expectations over a snapshot). Exit 0 all
    /// passed, 1 some failed, 2 a file could not be run.
    Test {
        files: Vec<PathBuf>,
        /// Also write the results as JUnit XML here.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Print every expectation, not only failures.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Flows of a snapshot whose verdict changes from OLD to NEW (policy
    /// files/directories or compiled rulesets). Exit 0 unchanged, 1 changed.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// Cluster snapshot (namespaces and pods).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// PORT[/PROTOCOL] (repeatable); default: every declared container
        /// port and every port either side names.
        #[arg(long = "port", value_parser = parse_port)]
        ports: Vec<(u16, Protocol)>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Work on a WASM plugin on its own.
    Plugin {
        #[command(subcommand)]
        cmd: PluginCmd,
    },
    /// Cluster CA and node credentials for PKI mode.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Manage the cluster CA.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Issue a node's certificate, key (unless --csr) and key token.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "pki")]
        ca: PathBuf,
        /// Node id (certificate CN; the `iss` of the node's tokens).
        #[arg(long)]
        node: String,
        /// Sign this PEM certificate signing request instead of generating a key.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Output directory (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Describe a certificate, private key or key token file.
    Inspect { file: PathBuf },
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Validate a module against ABI v1 and describe it.
    Inspect { wasm: PathBuf },
    /// Run a plugin against recorded inputs and expected outputs (YAML).
    /// Exit 0 all passed, 1 some failed, 2 the plugin or file is broken.
    Test {
        wasm: PathBuf,
        cases: PathBuf,
        /// Print every case, not only failures.
        #[arg(short, long)]
        verbose: bool,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA: ca.pem and ca.key (mode 0600) in --dir.
    Init {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Trust domain: the audience every token must name.
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite an existing CA.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn parse_port(s: &str) -> Result<(u16, Protocol), String> {
    let (p, proto) = match s.split_once('/') {
        Some((p, proto)) => (
            p,
            Protocol::parse(proto)
                .ok_or_else(|| format!("unknown protocol {proto:?} (TCP, UDP or SCTP)"))?,
        ),
        None => (s, Protocol::Tcp),
    };
    match p.parse::<u16>() {
        Ok(n) if n >= 1 => Ok((n, proto)),
        _ => Err(format!("{p:?} is not a port number (1-65535)")),
    }
}

/// An error already explained to the user.
struct Failed;

fn fail(msg: impl std::fmt::Display) -> Failed {
    eprintln!("{msg}");
    Failed
}

fn read_ruleset(path: &PathBuf) -> Result<Ruleset, Failed> {
    let bytes = std::fs::read(path).map_err(|e| fail(format!("error: {}: {e}", path.display())))?;
    Ruleset::decode(&bytes).map_err(|e| fail(format!("error: {}: {e}", path.display())))
}

/// Policies from --ruleset or from -f (with plugins from --plugin), and
/// the snapshot from -f, its identities resolved by the ruleset's
/// resolver plugins.
fn ruleset_and_cluster(
    files: &[PathBuf],
    ruleset: Option<&PathBuf>,
    pargs: &PluginArgs,
) -> Result<(Ruleset, Cluster, Option<Plugins>), Failed> {
    if ruleset.is_some() && !pargs.is_empty() {
        return Err(fail(
            "error: --plugin options apply to policies from -f; a compiled --ruleset carries its own plugins",
        ));
    }
    let specs = plugins::read_specs(&pargs.plugins, &pargs.configs, &pargs.fail_open)
        .map_err(|e| fail(format!("error: {e}")))?;
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let loaded = if files.is_empty() {
        source::Loaded::default()
    } else {
        source::load_with(files, &names).map_err(fail)?
    };
    let rs = match ruleset {
        Some(path) => {
            if !loaded.policies.is_empty() {
                return Err(fail(format!(
                    "error: --ruleset given, but the -f inputs also contain {} policies; pass only the cluster snapshot with -f",
                    loaded.policies.len()
                )));
            }
            read_ruleset(path)?
        }
        None => {
            let mut rs = compile::compile(&loaded);
            plugins::embed(&mut rs, specs).map_err(|e| fail(format!("error: {e}")))?;
            rs
        }
    };
    let mut cluster = loaded.cluster;
    let (plugins, warnings) =
        plugins::offline_view(&rs, &mut cluster).map_err(|e| fail(format!("error: {e}")))?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok((rs, cluster, plugins))
}

enum Party<'a> {
    Workload(&'a Workload),
    Ip(IpAddr),
}

fn party<'a>(cluster: &'a Cluster, s: &str) -> Result<Party<'a>, Failed> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Party::Ip(ip));
    }
    cluster.find(s).map(Party::Workload).ok_or_else(|| {
        fail(format!(
            "error: no pod {s:?} in the snapshot (use NS/POD; {} pods loaded)",
            cluster.workloads.len()
        ))
    })
}

fn endpoint<'a>(cluster: &'a Cluster, p: &Party<'a>) -> Endpoint<'a> {
    match p {
        Party::Workload(w) => cluster.endpoint(w),
        Party::Ip(ip) => cluster.ip_endpoint(*ip),
    }
}

fn warning(d: &trireme_compiler::diag::Diagnostic) -> String {
    match &d.location {
        Some(l) => format!("{l}: warning: {}", d.message),
        None => format!("warning: {}", d.message),
    }
}

/// A policy side of a diff: a compiled ruleset file, or YAML inputs.
fn policy_side(path: &PathBuf) -> Result<Ruleset, Failed> {
    let yaml = path.is_dir()
        || matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json" | "trireme")
        );
    if yaml {
        let loaded = source::load(std::slice::from_ref(path)).map_err(fail)?;
        Ok(compile::compile(&loaded))
    } else {
        read_ruleset(path)
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failed> {
    match cli.cmd {
        Cmd::Compile {
            files,
            output,
            deny_warnings,
            plugins: pargs,
        } => {
            let specs = plugins::read_specs(&pargs.plugins, &pargs.configs, &pargs.fail_open)
                .map_err(|e| fail(format!("error: {e}")))?;
            for s in specs.iter().filter(|s| s.fail_open) {
                eprintln!(
                    "warning: plugin {} is FAIL-OPEN: when it fails, nodes abstain instead of denying",
                    s.name
                );
            }
            let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
            let loaded = source::load_with(&files, &names).map_err(fail)?;
            for w in &loaded.warnings {
                eprintln!("{}", warning(w));
            }
            if deny_warnings && !loaded.warnings.is_empty() {
                return Err(fail(format!(
                    "error: {} warning(s) and --deny-warnings",
                    loaded.warnings.len()
                )));
            }
            let mut rs = compile::compile(&loaded);
            plugins::embed(&mut rs, specs).map_err(|e| fail(format!("error: {e}")))?;
            let bytes = rs.encode();
            // Write beside the target and rename: never leave a half-written ruleset.
            let tmp = output.with_extension("tmp~");
            std::fs::write(&tmp, &bytes)
                .and_then(|_| std::fs::rename(&tmp, &output))
                .map_err(|e| fail(format!("error: {}: {e}", output.display())))?;
            println!(
                "compiled {} policies, {} rules from {} files{} into {} ({} bytes, sha256:{})",
                rs.policies.len(),
                rs.rule_count(),
                rs.sources.len(),
                match rs.plugins.len() {
                    0 => String::new(),
                    n => format!(" and {n} plugin(s)"),
                },
                output.display(),
                bytes.len(),
                rs.content_hash()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Explain {
            files,
            ruleset,
            from,
            to,
            port,
            plugins,
        } => run(Cli {
            cmd: Cmd::Check {
                files,
                ruleset,
                from,
                to,
                port,
                verbose: true,
                plugins,
            },
        }),
        Cmd::Check {
            files,
            ruleset,
            from,
            to,
            port,
            verbose,
            plugins: pargs,
        } => {
            let (rs, cluster, plugins) = ruleset_and_cluster(&files, ruleset.as_ref(), &pargs)?;
            let (src, dst) = (party(&cluster, &from)?, party(&cluster, &to)?);
            let ev = plugins::evaluator(&rs, plugins.as_ref());
            let flow = Flow {
                src: endpoint(&cluster, &src),
                dst: endpoint(&cluster, &dst),
                port: port.0,
                protocol: port.1,
            };
            let d = ev.evaluate(&flow);
            println!(
                "{from} -> {to} {}/{}: {}",
                port.0,
                port.1,
                if d.allowed { "ALLOWED" } else { "DENIED" }
            );
            let lines = if verbose {
                explain::walk(&ev, &flow, &from, &to)
            } else {
                explain::decision(&rs, &d, &from, &to)
            };
            for line in lines {
                println!("  {line}");
            }
            Ok(if d.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Matrix {
            files,
            ruleset,
            ports,
            output,
            plugins: pargs,
        } => {
            let (rs, cluster, plugins) = ruleset_and_cluster(&files, ruleset.as_ref(), &pargs)?;
            let ev = plugins::evaluator(&rs, plugins.as_ref());
            let m = matrix::compute(&ev, &cluster, &ports);
            let stdout = std::io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let res = match output {
                Format::Text => m.write_text(&mut out),
                Format::Json => m.write_json(&mut out),
            };
            res.and_then(|_| out.flush())
                .map_err(|e| fail(format!("error: writing output: {e}")))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pki { cmd } => {
            use trireme_tokens::pki;
            let err = |e: trireme_tokens::KeyError| fail(format!("error: {e}"));
            match cmd {
                PkiCmd::Ca {
                    cmd:
                        CaCmd::Init {
                            dir,
                            trust_domain,
                            days,
                            force,
                        },
                } => {
                    for f in pki::ca_init(&dir, &trust_domain, days, force).map_err(err)? {
                        println!("wrote {}", f.display());
                    }
                }
                PkiCmd::Issue {
                    ca,
                    node,
                    csr,
                    out,
                    days,
                    force,
                } => {
                    let out = out.unwrap_or_else(|| ca.clone());
                    let issued =
                        pki::issue(&ca, &node, csr.as_deref(), &out, days, force).map_err(err)?;
                    for f in issued.files {
                        println!("wrote {}", f.display());
                    }
                }
                PkiCmd::Inspect { file } => print!("{}", pki::inspect(&file).map_err(err)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fmt {
            files,
            write,
            check,
        } => {
            if files.is_empty() {
                return Err(fail("error: no files given"));
            }
            let mut changed = 0;
            let mut broken = false;
            for f in &files {
                let text = match std::fs::read_to_string(f) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("error: {}: {e}", f.display());
                        broken = true;
                        continue;
                    }
                };
                let name: std::sync::Arc<str> = std::sync::Arc::from(f.display().to_string());
                match trireme_compiler::rules::format_text(&name, &text) {
                    Ok(out) if write => {
                        if out != text {
                            changed += 1;
                            std::fs::write(f, &out)
                                .map_err(|e| fail(format!("error: {}: {e}", f.display())))?;
                            println!("formatted {}", f.display());
                        }
                    }
                    Ok(out) if check => {
                        if out != text {
                            changed += 1;
                            println!("{}: not in canonical form", f.display());
                        }
                    }
                    Ok(out) => print!("{out}"),
                    Err(ds) => {
                        for d in ds {
                            eprintln!("{d}");
                        }
                        broken = true;
                    }
                }
            }
            Ok(if broken {
                ExitCode::from(2)
            } else if check && changed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Test {
            files,
            junit,
            verbose,
        } => {
            use trireme_compiler::assertions;
            if files.is_empty() {
                return Err(fail("error: no test files given"));
            }
            let mut reports = Vec::new();
            let mut broken = false;
            for f in &files {
                match assertions::run(f) {
                    Ok(r) => reports.push(r),
                    Err(e) => {
                        eprintln!("error: {e}");
                        broken = true;
                    }
                }
            }
            let (mut passed, mut failed) = (0, 0);
            for r in &reports {
                for o in &r.outcomes {
                    let e = &o.expectation;
                    if o.passed() {
                        passed += 1;
                        if verbose {
                            println!(
                                "ok    {}:{}: {}: {}",
                                r.file,
                                e.line,
                                e.text,
                                assertions::verdict(e.allow)
                            );
                        }
                        continue;
                    }
                    failed += 1;
                    match &o.result {
                        Ok(a) => println!(
                            "FAIL  {}:{}: {}: expected {}, got {}",
                            r.file,
                            e.line,
                            e.text,
                            assertions::verdict(e.allow),
                            assertions::verdict(*a)
                        ),
                        Err(m) => println!("FAIL  {}:{}: {}: {m}", r.file, e.line, e.text),
                    }
                    for line in &o.why {
                        println!("        {line}");
                    }
                }
            }
            println!("{passed} passed, {failed} failed");
            if let Some(path) = junit {
                std::fs::write(&path, assertions::junit(&reports))
                    .map_err(|e| fail(format!("error: {}: {e}", path.display())))?;
            }
            Ok(if broken {
                ExitCode::from(2)
            } else if failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Diff {
            old,
            new,
            files,
            ports,
            output,
        } => {
            use trireme_compiler::diff;
            let (ro, rn) = (policy_side(&old)?, policy_side(&new)?);
            let loaded = source::load(&files).map_err(fail)?;
            if !loaded.policies.is_empty() {
                return Err(fail(format!(
                    "error: -f should hold only the cluster snapshot; it also contains {} policies",
                    loaded.policies.len()
                )));
            }
            let ports = if ports.is_empty() {
                diff::default_ports(&loaded.cluster, &[&ro, &rn])
            } else {
                ports
            };
            if ports.is_empty() {
                return Err(fail(
                    "error: no ports to compare: the snapshot declares none and no rule names one; pass --port",
                ));
            }
            let changes = diff::compute(&ro, &rn, &loaded.cluster, &ports)
                .map_err(|e| fail(format!("error: {e}")))?;
            let stdout = std::io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let res = match output {
                Format::Text => diff::write_text(&changes, ports.len(), &mut out),
                Format::Json => diff::write_json(&changes, &mut out),
            };
            res.and_then(|_| out.flush())
                .map_err(|e| fail(format!("error: writing output: {e}")))?;
            Ok(if changes.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Plugin { cmd } => plugin_cmd(cmd),
        Cmd::Inspect { ruleset } => {
            let rs = read_ruleset(&ruleset)?;
            let stdout = std::io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            trireme_compiler::inspect::write(&rs, &mut out)
                .and_then(|_| out.flush())
                .map_err(|e| fail(format!("error: writing output: {e}")))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn plugin_cmd(cmd: PluginCmd) -> Result<ExitCode, Failed> {
    use trireme_compiler::plugin_test;
    match cmd {
        PluginCmd::Inspect { wasm } => {
            let text = plugin_test::inspect(&wasm).map_err(|e| fail(format!("error: {e}")))?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        PluginCmd::Test {
            wasm,
            cases,
            verbose,
        } => {
            let report =
                plugin_test::run(&wasm, &cases).map_err(|e| fail(format!("error: {e}")))?;
            let mut failed = 0;
            for c in &report.cases {
                match &c.failure {
                    None if verbose => println!("ok    {}: {}", c.name, c.got),
                    None => {}
                    Some(why) => {
                        failed += 1;
                        println!("FAIL  {}: {why}", c.name);
                    }
                }
            }
            println!("{} passed, {failed} failed", report.cases.len() - failed);
            Ok(if failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(Failed) => ExitCode::from(2),
    }
}

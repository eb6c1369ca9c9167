//! `gmpq pipeline`, `gmpq demo`: the whole method as a sequence of ordinary gmpq commands,
//! each recorded with its exact command line and skipped when its output already exists.

use super::commands::{dispatch, model_geometry};
use super::{Cli, DemoArgs, PipelineArgs};
use anyhow::{bail, Context, Result};
use clap::Parser;
use gmpq::checkpoint::Checkpoint;
use gmpq::pipeline::{
    training_done, Arm, RunLayout, RunRecord, RunSummary, StageRecord, StageStatus, RECORD_FORMAT,
};
use gmpq::policy::Policy;
use gmpq::search::{Geometry, Target};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Splits `KIND:PATH:N` into the dataset spec and the subset size.
pub(super) fn split_subset(s: &str) -> (String, Option<usize>) {
    if let Some((head, tail)) = s.rsplit_once(':') {
        if head.contains(':') && !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) {
            return (head.to_string(), tail.parse().ok());
        }
    }
    (s.to_string(), None)
}

fn budget(a: &PipelineArgs) -> Result<Target> {
    Ok(super::search::parse_target(
        a.target_bops.as_deref(),
        a.target_compression,
        a.target_size_mb,
    )?
    .unwrap_or(Target::Compression(64.0)))
}

/// The budget as the search command's flag.
fn budget_flag(t: &Target) -> [String; 2] {
    match *t {
        Target::Bops(b) => ["--target-bops".into(), format!("{b}")],
        Target::Compression(c) => ["--target-compression".into(), format!("{c}")],
        Target::SizeMb(s) => ["--target-size-mb".into(), format!("{s}")],
    }
}

/// Runs stages, keeping `pipeline.json` current after each.
struct Runner {
    layout: RunLayout,
    record: RunRecord,
    device: tch::Device,
}

impl Runner {
    fn save(&self) -> Result<()> {
        Ok(self.record.save(&self.layout.record())?)
    }

    /// Runs `argv` as a gmpq command unless `done` says the stage's output exists.
    fn command(&mut self, name: &str, done: bool, argv: Vec<String>) -> Result<()> {
        let command = command_line(&argv);
        let full: Vec<String> = std::iter::once("gmpq".to_string()).chain(argv).collect();
        if done {
            println!("[{name}] output exists, skipped");
            if self.record.stage(name).is_none() {
                self.record.set_stage(StageRecord {
                    name: name.into(),
                    command,
                    seconds: 0.0,
                    status: StageStatus::Done,
                    reused_from: None,
                });
                self.save()?;
            }
            return Ok(());
        }
        println!("[{name}] {command}");
        let cli = Cli::try_parse_from(&full)
            .map_err(|e| anyhow::anyhow!("stage {name}: bad command line {command}: {e}"))?;
        self.timed(name, command, |device| dispatch(cli.command, device))
    }

    /// Runs an in-process step and records its wall time.
    fn timed(
        &mut self,
        name: &str,
        command: String,
        f: impl FnOnce(tch::Device) -> Result<()>,
    ) -> Result<()> {
        self.record.set_stage(StageRecord {
            name: name.into(),
            command: command.clone(),
            seconds: 0.0,
            status: StageStatus::Running,
            reused_from: None,
        });
        self.save()?;
        let started = Instant::now();
        f(self.device).with_context(|| format!("stage {name} failed"))?;
        self.record.set_stage(StageRecord {
            name: name.into(),
            command,
            seconds: started.elapsed().as_secs_f64(),
            status: StageStatus::Done,
            reused_from: None,
        });
        self.save()
    }
}

/// The `gmpq …` command line of a stage's arguments, as pipeline.json records it.
fn command_line(argv: &[String]) -> String {
    shell_words::join(std::iter::once("gmpq").chain(argv.iter().map(String::as_str)))
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// Checks a given teacher: full precision and the pipeline's architecture.
fn check_teacher(path: &Path, model: &str, what: &str) -> Result<gmpq::ModelConfig> {
    let ck =
        Checkpoint::load(path).with_context(|| format!("loading {what} {}", path.display()))?;
    let arch: gmpq::model::Arch = model.parse()?;
    if ck.meta.model.arch != arch {
        bail!(
            "{what} {} is a {} but --model is {arch}",
            path.display(),
            ck.meta.model.arch
        );
    }
    if ck.meta.precision.is_some() {
        bail!(
            "{what} {} is quantized; give a full-precision checkpoint",
            path.display()
        );
    }
    Ok(ck.meta.model)
}

/// The network a run fine-tunes: the given target teacher's, or the one a teacher trained on
/// the target's train split gets (its native channels and size, its classes).
pub(super) fn target_model(
    model: &str,
    target_teacher: Option<&Path>,
    target_train: &dyn gmpq::data::ImageSource,
) -> Result<gmpq::ModelConfig> {
    if let Some(t) = target_teacher {
        return check_teacher(t, model, "--target-teacher");
    }
    let [channels, size, _] = super::commands::native_shape(target_train)?;
    Ok(gmpq::ModelConfig::new(
        model.parse()?,
        channels,
        target_train.num_classes(),
        size,
    ))
}

/// The geometry budgets of `model` are measured on.
pub(super) fn budget_geometry(model: &gmpq::ModelConfig) -> Result<Geometry> {
    let net = model_geometry(model)?;
    Ok(Geometry::new(net.convs(), net.fc_spec()))
}

/// The uniform policy with the most BOPs that meets the budget (ties: more weight bits).
/// The model of a teacher checkpoint, its layer geometry and its budget geometry.
fn teacher_geometry(teacher: &Path) -> Result<(gmpq::ModelConfig, gmpq::Model, Geometry)> {
    let cfg = Checkpoint::load(teacher)?.meta.model;
    let net = model_geometry(&cfg)?;
    let geometry = Geometry::new(net.convs(), net.fc_spec());
    Ok((cfg, net, geometry))
}

fn best_uniform(teacher: &Path, candidates: &[u32], target: &Target) -> Result<Policy> {
    let (cfg, net, geometry) = teacher_geometry(teacher)?;
    let limit = geometry.limit(target);
    let mut best: Option<(f64, u32, u32)> = None;
    for &w in candidates {
        for &a in candidates {
            let bits = vec![(w as f64, a as f64); geometry.layers.len()];
            let cost = geometry.measure(target, &bits);
            let score = geometry.measure(&Target::Compression(1.0), &bits);
            if cost <= limit * (1.0 + 1e-9)
                && best.is_none_or(|(s, bw, _)| score > s || (score == s && w > bw))
            {
                best = Some((score, w, a));
            }
        }
    }
    let (_, w, a) = best.with_context(|| {
        format!("no uniform policy with bits in {candidates:?} meets the budget {target}")
    })?;
    let mut policy =
        Policy::uniform(&cfg, net.convs(), w, a).with_totals(net.convs(), net.fc_spec());
    policy.meta = Some(serde_json::json!({
        "method": "uniform",
        "target": target,
        "cost": gmpq::policy::PolicyCost::default(),
    }));
    Ok(policy)
}

/// The HAWQ-style policy of the proxy teacher on (up to 512 of) the proxy subset's images.
fn hawq_on_proxy(
    teacher: &Path,
    w_bits: Vec<u32>,
    a_bits: Vec<u32>,
    target: &Target,
    (proxy, limit, subset_seed): (String, Option<usize>, u64),
    device: tch::Device,
) -> Result<Policy> {
    let source =
        super::commands::parse_spec_flag("--proxy", &proxy)?.load(gmpq::data::Split::Train)?;
    let indices = gmpq::data::stratified_subset(
        source.as_ref(),
        &gmpq::data::SubsetSpec {
            limit,
            per_class: None,
            seed: subset_seed,
        },
    )?;
    let cfg = gmpq::search::hawq::HawqConfig {
        candidates: gmpq::policy::Candidates {
            weight: w_bits,
            activation: a_bits,
        },
        samples: 16,
    };
    let n = indices.len().min(512);
    let r = gmpq::search::hawq::run(teacher, source, &indices[..n], &[*target], &cfg, device)?;
    let (_, mut policy) = r
        .policies
        .into_iter()
        .next()
        .context("HAWQ produced no policy")?;
    policy.meta = Some(serde_json::json!({
        "method": "hawq",
        "target": target,
        "hawq": { "settings": cfg, "sensitivities": r.sensitivities },
        "cost": gmpq::policy::PolicyCost { wall_seconds: r.seconds, images_processed: r.images as u64 },
    }));
    Ok(policy)
}

/// A random policy within 2 % under the budget, drawn with `seed` (the study's baseline).
fn random_within(
    teacher: &Path,
    w_bits: Vec<u32>,
    a_bits: Vec<u32>,
    target: &Target,
    seed: u64,
) -> Result<Policy> {
    let (cfg, net, geometry) = teacher_geometry(teacher)?;
    let mut template = Policy::uniform(&cfg, net.convs(), w_bits[0], a_bits[0]);
    template.candidates = gmpq::policy::Candidates {
        weight: w_bits,
        activation: a_bits,
    };
    let mut policy =
        gmpq::search::random_policy(&template, &geometry, target, 0.02, seed, 1_000_000)
            .with_context(|| {
                format!(
                    "no random policy fits the budget {target}: it is below the cheapest policy"
                )
            })?
            .with_totals(net.convs(), net.fc_spec());
    policy.meta = Some(serde_json::json!({
        "method": "random",
        "target": target,
        "seed": seed,
        "cost": gmpq::policy::PolicyCost::default(),
    }));
    Ok(policy)
}

/// A resumable full-precision training into `dir`.
pub(super) fn train_argv(model: &str, data: &str, epochs: usize, dir: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        model,
        "--data",
        data,
        "--epochs",
        &epochs.to_string(),
        "--out",
        &path_arg(dir),
        "--resume",
    ]
    .map(String::from)
    .to_vec()
}

/// A candidate list as its flag value: `2,3,4,6`.
fn bit_list(bits: &[u32]) -> String {
    bits.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The search command line shared by the searched arms (without output and data subset).
fn search_argv(
    a: &PipelineArgs,
    teacher: &Path,
    data: &str,
    target: &Target,
    weight: f64,
    epochs: usize,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "search".into(),
        "--teacher".into(),
        path_arg(teacher),
        "--data".into(),
        data.to_string(),
    ];
    argv.extend(budget_flag(target));
    argv.extend([
        "--attribution-weight".into(),
        weight.to_string(),
        "--epochs".into(),
        epochs.to_string(),
        "--step-epochs".into(),
        a.search_step_epochs.to_string(),
        "--recipe".into(),
        clap::ValueEnum::to_possible_value(&a.recipe)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        "--w-bits".into(),
        bit_list(&a.bits.w_bits),
        "--a-bits".into(),
        bit_list(&a.bits.a_bits),
    ]);
    argv
}

pub fn pipeline_cmd(a: PipelineArgs, device: tch::Device) -> Result<()> {
    let started = Instant::now();
    // --json: the summary is the only thing on stdout.
    let quiet = if a.json {
        super::StdoutToStderr::new()
    } else {
        None
    };
    let layout = RunLayout::new(&a.out);
    let target = budget(&a)?;
    let mut arms = vec![Arm::Gmpq];
    for &arm in &a.baseline {
        if !arms.contains(&arm) {
            arms.push(arm);
        }
    }
    // Every input is checked before stage 1 (nothing is created for a run that cannot start).
    let (proxy, proxy_limit) = split_subset(&a.proxy);
    super::commands::check_data("--proxy", &proxy)?;
    let target_train = super::commands::check_data("--target", &split_subset(&a.target).0)?;
    let bit_sets = a.bits.candidates()?;
    // The uniform arm's widths: those both candidate sets hold.
    let candidates = {
        let mut c = bit_sets.weight.clone();
        c.retain(|b| bit_sets.activation.contains(b));
        c
    };
    if let Some(t) = &a.teacher {
        check_teacher(t, &a.model, "--teacher")?;
    }
    // An unreachable budget is refused here, not after the teachers have trained.
    let model = target_model(&a.model, a.target_teacher.as_deref(), target_train.as_ref())?;
    gmpq::search::check_feasible(&budget_geometry(&model)?, &target, &bit_sets)?;

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let _lock = gmpq::checkpoint::DirLock::acquire(&a.out)?;
    let settings = serde_json::to_value(&a)?;
    let command = shell_words::join(std::env::args());
    let record = match RunRecord::load(&layout.record())? {
        Some(mut r) => {
            r.check_settings(&a.out, &settings)?;
            for arm in &arms {
                if !r.arms.contains(arm) {
                    r.arms.push(*arm);
                }
            }
            r.command = command;
            r
        }
        None => {
            let mut entries = std::fs::read_dir(&a.out)?.flatten();
            if entries.any(|e| e.file_name() != gmpq::checkpoint::LOCK_FILE) {
                bail!(
                    "{} is not empty and holds no {}: choose another --out",
                    a.out.display(),
                    gmpq::pipeline::RECORD_FILE
                );
            }
            RunRecord {
                format: RECORD_FORMAT,
                command,
                settings,
                arms: arms.clone(),
                stages: Vec::new(),
            }
        }
    };
    let all_arms = record.arms.clone();
    let mut run = Runner {
        layout: layout.clone(),
        record,
        device,
    };
    run.save()?;

    let mut common: Vec<String> = Vec::new();
    if a.hflip {
        common.push("--hflip".into());
    }
    common.extend(["--seed".into(), a.seed.to_string()]);
    // The proxy may be data that must not be flipped (digits) while the target is flipped.
    let mut proxy_common: Vec<String> = vec!["--seed".into(), a.seed.to_string()];
    if a.proxy_hflip.unwrap_or(a.hflip) {
        proxy_common.push("--hflip".into());
    }
    let proxy_subset: Vec<String> = match proxy_limit {
        Some(n) => vec![
            "--limit".into(),
            n.to_string(),
            "--subset-seed".into(),
            a.subset_seed.to_string(),
        ],
        None => vec![],
    };
    let mut target_subset: Vec<String> = Vec::new();
    if let Some(n) = a.target_limit {
        target_subset.extend(["--limit".into(), n.to_string()]);
    }
    if let Some(n) = a.target_test_limit {
        target_subset.extend(["--test-limit".into(), n.to_string()]);
    }

    // 1. FP teacher on the proxy.
    let proxy_teacher = match &a.teacher {
        Some(t) => t.clone(),
        None => {
            let dir = layout.proxy_teacher();
            let mut argv = train_argv(&a.model, &proxy, a.teacher_epochs, &dir);
            argv.extend(["--test-limit".into(), "1000".into()]);
            argv.extend(proxy_subset.iter().cloned());
            argv.extend(proxy_common.iter().cloned());
            run.command(
                "teacher-proxy",
                training_done(&dir, a.teacher_epochs)?,
                argv,
            )?;
            gmpq::train::last_checkpoint(&dir)
        }
    };

    // 2. Policies that need no target teacher: searches on the proxy, uniform, random.
    for &arm in all_arms.iter().filter(|a| **a != Arm::EdmipsTarget) {
        let policy = layout.policy(arm);
        let name = format!("search-{}", arm.name());
        if !arm.searched() {
            if policy.exists() {
                println!("[{name}] output exists, skipped");
                continue;
            }
            let (teacher, cands, dir, label) = (
                proxy_teacher.clone(),
                candidates.clone(),
                layout.search(arm),
                name.clone(),
            );
            let (w_bits, a_bits) = (bit_sets.weight.clone(), bit_sets.activation.clone());
            let seed = a.seed;
            let proxy_spec = (proxy.clone(), proxy_limit, a.subset_seed);
            // What the in-process step does, for the record (these arms have no command of
            // their own, except HAWQ's equivalent `gmpq search --method hawq`).
            let what = match arm {
                Arm::Random => format!(
                    "(in gmpq) a random policy within 2 % under {target}, bits {} / {}, seed {seed}",
                    bit_list(&a.bits.w_bits), bit_list(&a.bits.a_bits)
                ),
                Arm::Hawq => {
                    let mut argv = vec![
                        "search".to_string(),
                        "--method".into(),
                        "hawq".into(),
                        "--teacher".into(),
                        path_arg(&teacher),
                        "--data".into(),
                        proxy.clone(),
                        "--subset-seed".into(),
                        a.subset_seed.to_string(),
                        "--w-bits".into(),
                        bit_list(&a.bits.w_bits),
                        "--a-bits".into(),
                        bit_list(&a.bits.a_bits),
                        "--out".into(),
                        path_arg(&dir),
                    ];
                    if let Some(n) = proxy_limit {
                        argv.extend(["--limit".into(), n.to_string()]);
                    }
                    argv.extend(budget_flag(&target));
                    command_line(&argv)
                }
                _ => format!(
                    "(in gmpq) the uniform policy with the most BOPs within {target} over the \
                     common candidates {cands:?}"
                ),
            };
            run.timed(&name, what, move |device| {
                let p = match arm {
                    Arm::Random => random_within(&teacher, w_bits, a_bits, &target, seed)?,
                    Arm::Hawq => {
                        hawq_on_proxy(&teacher, w_bits, a_bits, &target, proxy_spec, device)?
                    }
                    _ => best_uniform(&teacher, &cands, &target)?,
                };
                std::fs::create_dir_all(&dir)?;
                p.save(&policy)?;
                let t = p.totals.clone().context("totals")?;
                println!(
                    "[{label}] {:.4} G BOPs, compression {:.2}x, size {:.3} MB",
                    t.bops as f64 / 1e9,
                    t.compression,
                    t.size_mb
                );
                gmpq::report::bit_allocation_svg(&[(arm.label(), &p)], &dir.join("bits.svg"))?;
                Ok(())
            })?;
            continue;
        }
        let weight = if arm == Arm::Edmips {
            0.0
        } else {
            a.attribution_weight
        };
        let mut argv = search_argv(&a, &proxy_teacher, &proxy, &target, weight, a.search_epochs);
        argv.extend(["--out".into(), path_arg(&layout.search(arm))]);
        if let (Arm::Gmpq, Some(p)) = (arm, a.p) {
            argv.extend(["--p".into(), p.to_string()]);
        }
        argv.extend(proxy_subset.iter().cloned());
        argv.extend(proxy_common.iter().cloned());
        run.command(&name, policy.exists(), argv)?;
    }

    // 3. FP teacher on the target.
    let target_teacher = match &a.target_teacher {
        Some(t) => t.clone(),
        None => {
            let dir = layout.target_teacher();
            let mut argv = train_argv(&a.model, &a.target, a.target_teacher_epochs, &dir);
            argv.extend(target_subset.iter().cloned());
            argv.extend(common.iter().cloned());
            run.command(
                "teacher-target",
                training_done(&dir, a.target_teacher_epochs)?,
                argv,
            )?;
            gmpq::train::last_checkpoint(&dir)
        }
    };

    // The conventional route: EdMIPS searched on the target itself, guided by its teacher.
    if all_arms.contains(&Arm::EdmipsTarget) {
        let arm = Arm::EdmipsTarget;
        let epochs = a.target_search_epochs.unwrap_or(a.search_epochs);
        let mut argv = search_argv(&a, &target_teacher, &a.target, &target, 0.0, epochs);
        argv.extend(["--out".into(), path_arg(&layout.search(arm))]);
        if let Some(n) = a.target_limit {
            argv.extend(["--limit".into(), n.to_string()]);
        }
        argv.extend(common.iter().cloned());
        run.command("search-edmips-target", layout.policy(arm).exists(), argv)?;
    }

    // 4. Fine-tune every arm's policy on the target (evaluated on its test split each epoch).
    let mut finetuned = Vec::new();
    let finetune_argv = |l: &RunLayout, arm: Arm| {
        let mut argv: Vec<String> = vec![
            "finetune".into(),
            "--init".into(),
            path_arg(&target_teacher),
            "--policy".into(),
            path_arg(&l.policy(arm)),
            "--data".into(),
            a.target.clone(),
            "--epochs".into(),
            a.finetune_epochs.to_string(),
            "--out".into(),
            path_arg(&l.finetune(arm)),
            "--resume".into(),
        ];
        argv.extend(["--lr".into(), a.finetune_lr.to_string()]);
        argv.extend(target_subset.iter().cloned());
        argv.extend(common.iter().cloned());
        argv
    };
    for &arm in &all_arms {
        let dir = layout.finetune(arm);
        let name = format!("finetune-{}", arm.name());
        let done = training_done(&dir, a.finetune_epochs)?;
        let reusable = if done || a.reuse_finetunes_from.is_empty() {
            None
        } else {
            gmpq::pipeline::reusable_training(
                &layout,
                &a.reuse_finetunes_from,
                arm,
                &name,
                a.finetune_epochs,
                |l| command_line(&finetune_argv(l, arm)),
            )?
        };
        if let Some(stage) = reusable {
            let from = stage.reused_from.clone().unwrap_or_default();
            println!(
                "[{name}] the same fine-tuning (command and policy) finished in {}: copied",
                from.display()
            );
            gmpq::pipeline::copy_training(&from, &dir)?;
            run.record.set_stage(StageRecord {
                command: command_line(&finetune_argv(&layout, arm)),
                ..stage
            });
            run.save()?;
        } else {
            run.command(&name, done, finetune_argv(&layout, arm))?;
        }
        finetuned.push(gmpq::train::last_checkpoint(&dir));
    }

    // 5. Attribution of teacher and students on target images, summary, report.
    let mut maps = vec![target_teacher.clone()];
    maps.extend(finetuned);
    let target_spec = a.target.clone();
    let out_png = layout.target_attribution();
    let what = format!(
        "(in gmpq) CAM heatmaps of the target teacher and every fine-tuned arm on 6 test \
         images of {} → {}",
        a.target,
        out_png.display()
    );
    run.timed("attribution", what, |device| {
        super::search::attribution_grid(&maps, &target_spec, 6, &out_png, device).map(|_| ())
    })?;
    let summary = RunSummary::collect(&layout, &all_arms)?;
    gmpq::checkpoint::write_atomic(&layout.summary(), &serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("writing {}", layout.summary().display()))?;
    let page = gmpq::report::write_run_report(&a.out)?;
    drop(quiet);
    print_summary(
        &summary,
        &page,
        &layout,
        started.elapsed().as_secs_f64(),
        a.json,
    )
}

fn print_summary(
    s: &RunSummary,
    page: &Path,
    layout: &RunLayout,
    seconds: f64,
    json: bool,
) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "summary": s, "report": page, "seconds": seconds,
            }))?
        );
        return Ok(());
    }
    let pct = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}%"));
    println!();
    println!(
        "{:<18} {:>10} {:>12} {:>10} {:>10} {:>9}",
        "arm", "BOPs (G)", "compression", "size MB", "search", "top-1"
    );
    println!(
        "{:<18} {:>10} {:>12} {:>10} {:>10} {:>9}",
        "FP",
        s.fp_bops.map_or("—".into(), |b| format!("{:.4}", b / 1e9)),
        "1.00x",
        s.fp_size_mb.map_or("—".into(), |v| format!("{v:.3}")),
        "—",
        pct(s.fp_top1)
    );
    for a in &s.arms {
        println!(
            "{:<18} {:>10} {:>12} {:>10} {:>10} {:>9}",
            a.arm.label(),
            a.bops.map_or("—".into(), |b| format!("{:.4}", b / 1e9)),
            a.compression.map_or("—".into(), |c| format!("{c:.2}x")),
            a.size_mb.map_or("—".into(), |v| format!("{v:.3}")),
            a.search_seconds.map_or("—".into(), |v| format!("{v:.0} s")),
            pct(a.top1)
        );
    }
    println!(
        "\nreport: {}\nrun folder: {} (this pass took {:.0} s; stage times in {})",
        page.display(),
        layout.dir.display(),
        seconds,
        layout.record().display()
    );
    Ok(())
}

/// The demo's settings: the method end to end on the bundled Fashion-MNIST subset, sized to
/// finish in minutes on two cores.
pub fn demo_args(out: PathBuf, json: bool) -> PipelineArgs {
    PipelineArgs {
        model: "resnet20".into(),
        proxy: "bundled:fashion-mnist:1000".into(),
        target: "bundled:fashion-mnist".into(),
        target_limit: None,
        target_test_limit: None,
        target_compression: Some(64.0),
        target_bops: None,
        target_size_mb: None,
        teacher: None,
        target_teacher: None,
        baseline: vec![Arm::Uniform, Arm::Edmips],
        teacher_epochs: 15,
        target_teacher_epochs: 12,
        search_epochs: 8,
        target_search_epochs: None,
        search_step_epochs: 4,
        proxy_hflip: None,
        finetune_epochs: 3,
        finetune_lr: gmpq::train::FINETUNE_LR,
        recipe: super::RecipeArg::Scarce,
        attribution_weight: 20.0,
        p: None,
        bits: super::BitCandidateArgs::default(),
        hflip: true,
        seed: 0,
        subset_seed: 0,
        out,
        json,
        reuse_finetunes_from: Vec::new(),
    }
}

pub fn demo_cmd(a: DemoArgs, device: tch::Device) -> Result<()> {
    pipeline_cmd(demo_args(a.out, a.json), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_subset_suffix() {
        assert_eq!(
            split_subset("idx:data/fmnist:2000"),
            ("idx:data/fmnist".into(), Some(2000))
        );
        assert_eq!(
            split_subset("idx:data/fmnist"),
            ("idx:data/fmnist".into(), None)
        );
        assert_eq!(
            split_subset("bundled:fashion-mnist:1000"),
            ("bundled:fashion-mnist".into(), Some(1000))
        );
        assert_eq!(split_subset("folder:a:b"), ("folder:a:b".into(), None));
    }

    /// pipeline.json records the values used, typed: numbers, lists and arm names.
    #[test]
    fn recorded_settings_are_typed_values() {
        let argv = [
            "gmpq",
            "pipeline",
            "--proxy",
            "bundled:mnist:500",
            "--target",
            "bundled:fashion-mnist",
            "--w-bits",
            "4,2,2",
            "--baseline",
            "uniform,hawq",
        ];
        let Ok(Cli {
            command: super::super::Command::Pipeline(a),
            ..
        }) = Cli::try_parse_from(argv)
        else {
            panic!("pipeline arguments did not parse");
        };
        assert_eq!(a.baseline, vec![Arm::Uniform, Arm::Hawq]);
        let s = serde_json::to_value(&a).unwrap();
        assert_eq!(s["finetune_lr"], serde_json::json!(0.01));
        assert_eq!(s["w_bits"], serde_json::json!([4, 2, 2]));
        assert_eq!(s["a_bits"], serde_json::json!([2, 3, 4, 6]));
        assert_eq!(s["recipe"], "scarce");
        assert!(
            search_argv(&a, Path::new("t"), "d", &Target::Compression(64.0), 0.0, 1)
                .windows(2)
                .any(|w| w == ["--recipe", "scarce"])
        );
        assert!(s.get("baseline").is_none() && s.get("bits").is_none());
        assert_eq!(bit_list(&a.bits.candidates().unwrap().weight), "2,4");
        // GMPQ always runs: it is not a baseline; bits outside 2..=16 are refused.
        for bad in [["--baseline", "gmpq"], ["--w-bits", "1,4"]] {
            let mut v = argv[..6].to_vec();
            v.extend(bad);
            assert!(Cli::try_parse_from(v).is_err(), "{bad:?} accepted");
        }
    }
}

//! `gmpq study CONFIG`: shared teachers, then one pipeline per (pair, budget, seed), then the
//! results table. Every step resumes, so an interrupted study continues where it stopped.

use super::commands::dispatch;
use super::pipeline::pipeline_cmd;
use super::{Cli, PipelineArgs, StudyArgs};
use anyhow::{Context, Result};
use clap::Parser;
use gmpq::pipeline::{training_done, Arm, RunLayout};
use gmpq::report::Bars;
use gmpq::study::{self, StudyConfig, TeacherConfig};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Trains (or resumes, or skips) a shared FP teacher; returns its checkpoint.
fn teacher(model: &str, t: &TeacherConfig, dir: &Path, device: tch::Device) -> Result<PathBuf> {
    let ck = gmpq::train::last_checkpoint(dir);
    if training_done(dir, t.epochs)? {
        println!("[study] teacher {} done, skipped", dir.display());
        return Ok(ck);
    }
    let (data, limit) = super::pipeline::split_subset(&t.data);
    let mut argv = vec!["gmpq".to_string()];
    argv.extend(super::pipeline::train_argv(model, &data, t.epochs, dir));
    if let Some(n) = limit {
        argv.extend(["--limit".into(), n.to_string()]);
    }
    if t.hflip {
        argv.push("--hflip".into());
    }
    println!("[study] {}", shell_words::join(&argv));
    dispatch(Cli::try_parse_from(&argv)?.command, device)?;
    Ok(ck)
}

/// Every data set and budget of the study (of the pairs it runs) is checked before any
/// teacher trains: a typo in the last pair's path must not surface hours in.
fn check_inputs(config: &StudyConfig, pairs: &[String]) -> Result<()> {
    let (target_data, _) = super::pipeline::split_subset(&config.target.data);
    let target = super::commands::check_data("the study's target", &target_data)?;
    let model = super::pipeline::target_model(&config.model, None, target.as_ref())?;
    let geometry = super::pipeline::budget_geometry(&model)?;
    // The candidates every run of the study searches (its pipelines' defaults).
    let candidates = super::BitCandidateArgs::default().candidates()?;
    for p in config
        .pairs
        .iter()
        .filter(|p| pairs.is_empty() || pairs.contains(&p.name))
    {
        let (proxy, _) = super::pipeline::split_subset(&p.proxy.data);
        super::commands::check_data(&format!("pair {}: proxy", p.name), &proxy)?;
        for b in &p.budgets {
            let budget = gmpq::search::Target::Compression(b.compression);
            gmpq::search::check_feasible(&geometry, &budget, &candidates)
                .with_context(|| format!("pair {}", p.name))?;
        }
    }
    Ok(())
}

pub fn study_cmd(a: StudyArgs, device: tch::Device) -> Result<()> {
    let config = StudyConfig::load(&a.config)?;
    if let Some(unknown) = a
        .pair
        .iter()
        .find(|n| !config.pairs.iter().any(|p| &p.name == *n))
    {
        let known: Vec<&str> = config.pairs.iter().map(|p| p.name.as_str()).collect();
        anyhow::bail!(
            "--pair {unknown}: {} has no such pair ({})",
            a.config.display(),
            known.join(", ")
        );
    }
    if !a.tables_only {
        check_inputs(&config, &a.pair)?;
    }
    // The config a study started with stays beside its results.
    let saved = a.out.join("study.json");
    if a.tables_only && !saved.exists() {
        anyhow::bail!("{} holds no study (no study.json)", a.out.display());
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    match std::fs::read_to_string(&saved) {
        Ok(text) => {
            let old: StudyConfig = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", saved.display()))?;
            if old != config {
                anyhow::bail!(
                    "{} was started with another configuration ({}); use another --out",
                    a.out.display(),
                    saved.display()
                );
            }
        }
        Err(_) => gmpq::checkpoint::write_atomic(&saved, &serde_json::to_vec_pretty(&config)?)?,
    }
    if a.tables_only {
        let page = write_tables(&config, &a.out, &config.runs(&a.out))?;
        println!("[study] results: {}", page.display());
        return Ok(());
    }
    let target_teacher = teacher(
        &config.model,
        &config.target,
        &a.out.join("teacher-target"),
        device,
    )?;
    let runs = config.runs(&a.out);
    let baselines: Vec<Arm> = config
        .arms
        .iter()
        .copied()
        .filter(|a| *a != Arm::Gmpq)
        .collect();
    // Runs another study process is working on (same --out): it owns them, this one moves on.
    let mut held = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        if !a.pair.is_empty() && !a.pair.contains(&r.pair) {
            continue;
        }
        let pair = config
            .pairs
            .iter()
            .find(|p| p.name == r.pair)
            .context("pair")?;
        let proxy_teacher = teacher(
            &config.model,
            &pair.proxy,
            &a.out.join(format!("teacher-{}", pair.name)),
            device,
        )?;
        if r.finished(&config.arms, config.finetune_epochs)? {
            println!(
                "[study] run {}/{} ({}) finished, skipped",
                i + 1,
                runs.len(),
                r.dir.display()
            );
            continue;
        }
        println!(
            "[study] run {}/{}: {} at compression {}, seed {} → {}",
            i + 1,
            runs.len(),
            r.pair,
            r.compression,
            r.seed,
            r.dir.display()
        );
        let args = PipelineArgs {
            model: config.model.clone(),
            proxy: pair.proxy.data.clone(),
            target: config.target.data.clone(),
            target_compression: Some(r.compression),
            teacher: Some(proxy_teacher),
            target_teacher: Some(target_teacher.clone()),
            baseline: baselines.clone(),
            search_epochs: config.search_epochs,
            target_search_epochs: Some(config.target_search_epochs),
            search_step_epochs: (config.search_epochs * 2 / 5).max(1),
            finetune_epochs: config.finetune_epochs,
            hflip: config.hflip,
            proxy_hflip: Some(pair.proxy.hflip),
            seed: r.seed,
            // Proxy-independent arms (uniform, random) of another pair at this budget and seed
            // are the same fine-tuning.
            reuse_finetunes_from: runs
                .iter()
                .filter(|o| o.seed == r.seed && o.dir != r.dir)
                .map(|o| o.dir.clone())
                .collect(),
            ..super::pipeline::demo_args(r.dir.clone(), false)
        };
        match pipeline_cmd(args, device) {
            Ok(()) => {}
            Err(e) if held_by_another_process(&e, &r.dir) => {
                println!("[study] {e}: skipping this run");
                held.push(r.dir.display().to_string());
                continue;
            }
            Err(e) => return Err(e),
        }
        write_tables(&config, &a.out, &runs)?;
    }
    let page = write_tables(&config, &a.out, &runs)?;
    println!("[study] results: {}", page.display());
    if !held.is_empty() {
        println!(
            "[study] {} run(s) belonged to another process: {}. When it ends, run the study again (or with --tables-only) for complete tables.",
            held.len(),
            held.join(", ")
        );
    }
    Ok(())
}

/// Whether `e` is the lock on a run folder that another gmpq process holds, which lets several
/// study processes share one `--out`, each taking the runs the others are not working on.
fn held_by_another_process(e: &anyhow::Error, run_dir: &Path) -> bool {
    matches!(
        e.downcast_ref::<gmpq::checkpoint::LockError>(),
        Some(gmpq::checkpoint::LockError::Busy { dir, .. }) if dir == run_dir
    )
}

/// Mean bits per layer of the searched arms, side by side, one weights and one activations
/// chart per (pair, budget), appended to the page.
fn bits_charts(
    config: &StudyConfig,
    out: &Path,
    runs: &[study::StudyRun],
    page: &mut String,
) -> Result<()> {
    let searched: Vec<Arm> = [Arm::Gmpq, Arm::Edmips, Arm::EdmipsTarget]
        .into_iter()
        .filter(|a| config.arms.contains(a))
        .collect();
    let means = study::mean_bits(runs, &searched)?;
    let mut groups: Vec<(String, f64)> = means
        .iter()
        .map(|m| (m.pair.clone(), m.compression_target))
        .collect();
    groups.dedup();
    if !groups.is_empty() {
        page.push_str("<h2>Bits per layer (mean over seeds)</h2>");
    }
    for (pair, budget) in groups {
        let _ = write!(page, "<h3>{pair}, {budget}×</h3><div>");
        let group: Vec<&study::MeanBits> = means
            .iter()
            .filter(|m| m.pair == pair && m.compression_target == budget)
            .collect();
        for (kind, short) in [("weight", "w"), ("activation", "a")] {
            let bars: Vec<Bars> = group
                .iter()
                .map(|m| Bars {
                    label: format!("{} ({} runs)", m.arm.label(), m.runs),
                    values: if short == "w" { &m.w_bits } else { &m.a_bits }.clone(),
                    colour: match m.arm {
                        Arm::Gmpq => (0, 90, 200, 0.85),
                        Arm::Edmips => (210, 40, 40, 0.85),
                        _ => (40, 160, 60, 0.85),
                    },
                })
                .collect();
            let name = format!("bits-{pair}-c{budget}-{short}.svg");
            gmpq::report::grouped_bars_svg(
                &format!("{kind} bits per layer"),
                "bits",
                &group[0].layers,
                &bars,
                &out.join(&name),
            )?;
            let _ = write!(page, "<img src=\"{name}\" style=\"max-width:100%\">");
        }
        page.push_str("</div>");
    }
    Ok(())
}

/// Writes results.csv/json and a small HTML page linking every run's report.
fn write_tables(config: &StudyConfig, out: &Path, runs: &[study::StudyRun]) -> Result<PathBuf> {
    let rows = study::collect(runs, &config.arms, config.finetune_epochs)?;
    let stats = study::aggregate(&rows);
    let paired = study::paired_differences(&rows);
    study::write_results(out, &rows, &stats, &paired)?;
    let mut page = String::from(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>gmpq study</title>\
         <style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body><h1>gmpq study</h1>\
         <table><tr><th>pair</th><th>budget</th><th>arm</th><th>seeds</th><th>top-1 mean ± std</th>\
         <th>BOPs (G)</th><th>size (MB)</th><th>search s</th><th>search images</th></tr>",
    );
    for s in &stats {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}×</td><td>{}</td><td>{}</td><td>{:.2} ± {:.2}</td><td>{:.4}</td><td>{:.3}</td><td>{:.0}</td><td>{:.0}</td></tr>",
            s.pair,
            s.compression_target,
            s.arm.label(),
            s.seeds,
            s.top1_mean,
            s.top1_std,
            s.bops_mean / 1e9,
            s.size_mb_mean,
            s.search_seconds_mean,
            s.search_images_mean
        );
    }
    page.push_str("</table>");
    if !paired.is_empty() {
        page.push_str(
            "<h2>GMPQ minus each arm, paired by seed</h2><table><tr><th>pair</th><th>budget</th>\
             <th>against</th><th>mean difference</th><th>GMPQ ahead</th><th>per seed</th></tr>",
        );
        for d in &paired {
            let seeds: Vec<String> = d
                .per_seed
                .iter()
                .map(|(s, v)| format!("{s}: {v:+.2}"))
                .collect();
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}×</td><td>{}</td><td>{:+.2}</td><td>{} of {}</td><td>{}</td></tr>",
                d.pair,
                d.compression_target,
                d.against.label(),
                d.mean,
                d.gmpq_ahead,
                d.per_seed.len(),
                seeds.join(", ")
            );
        }
        page.push_str("</table>");
    }
    bits_charts(config, out, runs, &mut page)?;
    page.push_str("<h2>Runs</h2><ul>");
    for r in runs {
        let report = RunLayout::new(&r.dir).report();
        if report.exists() {
            let rel = report.strip_prefix(out).unwrap_or(&report);
            let _ = write!(
                page,
                "<li><a href=\"{}\">{}</a></li>",
                rel.display(),
                rel.display()
            );
        }
    }
    page.push_str("</ul></body></html>\n");
    let path = out.join("study.html");
    gmpq::checkpoint::write_atomic(&path, page.as_bytes())?;
    Ok(path)
}

//! `gmpq search` and `gmpq attribution`.

use super::{AttributionArgs, ExtractArgs, SearchArgs};
use anyhow::{bail, Context, Result};
use gmpq::data::{stratified_subset, ConcatDataset, ImageSource, Split, SubsetSpec};
use gmpq::search::{self, EpochLog, SearchConfig, SearchJob, SearchProgress, Target};
use gmpq::train::Augment;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Parses `1.2G`, `800M`, `5e8` as a BOPs count.
pub(super) fn parse_bops(s: &str) -> Result<f64> {
    let (num, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1e9),
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('K' | 'k') => (&s[..s.len() - 1], 1e3),
        _ => (s, 1.0),
    };
    let v: f64 = num
        .parse()
        .with_context(|| format!("'{s}' is not a BOPs count"))?;
    if v <= 0.0 {
        bail!("BOPs target must be positive");
    }
    Ok(v * mult)
}

/// A Pareto point: a compression ratio (plain number) or a BOPs count (with G/M/K suffix).
/// The budget of `--target-bops`, `--target-compression` or `--target-size-mb` (clap lets at
/// most one through), checked; `None` when none is given.
pub(super) fn parse_target(
    bops: Option<&str>,
    compression: Option<f64>,
    size_mb: Option<f64>,
) -> Result<Option<Target>> {
    Ok(match (bops, compression, size_mb) {
        (Some(b), _, _) => Some(Target::Bops(parse_bops(b)?)),
        (_, Some(c), _) if c <= 1.0 => bail!("--target-compression must be above 1"),
        (_, Some(c), _) => Some(Target::Compression(c)),
        (_, _, Some(s)) if s <= 0.0 => bail!("--target-size-mb must be positive"),
        (_, _, Some(s)) => Some(Target::SizeMb(s)),
        (None, None, None) => None,
    })
}

fn parse_pareto(s: &str) -> Result<Target> {
    if s.ends_with(['G', 'g', 'M', 'm', 'K', 'k']) {
        return Ok(Target::Bops(parse_bops(s)?));
    }
    let v: f64 = s
        .parse()
        .with_context(|| format!("'{s}' is neither a ratio nor BOPs"))?;
    if v <= 1.0 {
        bail!("compression target {v} must be above 1");
    }
    Ok(Target::Compression(v))
}

struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl SearchProgress for Bars {
    fn phase(&self, name: &str, epochs: usize, batches: usize) {
        let bar = ProgressBar::new((epochs * batches) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        if let Ok(mut b) = self.bar.lock() {
            if let Some(old) = b.replace(bar) {
                old.finish_and_clear();
            }
        }
    }
    fn step(&self, ce: f64, attr: f64, expected_bops: f64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.set_message(format!(
                    "CE {ce:.3} attr {attr:.4} E[BOPs] {:.3}G",
                    expected_bops / 1e9
                ));
                bar.inc(1);
            }
        }
    }
    fn epoch(&self, l: &EpochLog) {
        let line = format!(
            "epoch {:>3}: CE {:.4} L_attr {:.5} L_c {:.2} p {:.2} λ {:.2e} E[BOPs] {:.4}G argmax {:.4}G proxy top-1 {:.2}% rank corr {:.3} ({:.1}s)",
            l.epoch, l.ce, l.attribution_loss, l.complexity_loss, l.p, l.lambda,
            l.expected_bops / 1e9, l.argmax_bops / 1e9, l.argmax_proxy_top1, l.rank_correlation, l.seconds
        );
        match self.bar.lock().ok().and_then(|b| b.as_ref().cloned()) {
            Some(bar) => bar.suspend(|| tracing::info!("{line}")),
            None => tracing::info!("{line}"),
        }
    }
}

pub fn search_cmd(a: SearchArgs, device: tch::Device) -> Result<()> {
    let spec = super::commands::parse_spec(&a.data)?;
    let proxy_train = spec.load(Split::Train)?;
    let train_indices = stratified_subset(
        proxy_train.as_ref(),
        &SubsetSpec {
            limit: a.subset.limit,
            per_class: a.subset.per_class,
            seed: a.subset.subset_seed,
        },
    )?;
    let proxy_test = spec.load(Split::Test)?;
    let val_indices = stratified_subset(
        proxy_test.as_ref(),
        &SubsetSpec::limited(
            Some(a.val_images.min(proxy_test.len())),
            a.subset.subset_seed,
        ),
    )?;
    // One source for both: the loader takes indices into it; test images come after train.
    let offset = proxy_train.len();
    let proxy: Arc<dyn ImageSource> = Arc::new(ConcatDataset::new(proxy_train, proxy_test));
    let val_indices: Vec<usize> = val_indices.into_iter().map(|i| i + offset).collect();

    let mut targets: Vec<Target> = parse_target(
        a.target_bops.as_deref(),
        a.target_compression,
        a.target_size_mb,
    )?
    .into_iter()
    .collect();
    for p in &a.pareto {
        targets.push(parse_pareto(p)?);
    }
    let config = SearchConfig {
        candidates: a.bits.candidates()?,
        epochs: a.epochs,
        warmup_epochs: if targets.len() > 1 {
            a.warmup_epochs.unwrap_or(a.epochs / 3)
        } else {
            0
        },
        batch_size: a.batch_size,
        lr: a.lr,
        step_epochs: a.step_epochs,
        attribution_weight: a.attribution_weight,
        p: a.p,
        complexity_weight: a.cd,
        attribution: a.attribution.into(),
        augment: Augment {
            crop_padding: 2,
            hflip: a.hflip,
        },
        seed: a.seed,
        ..Default::default()
    };
    let mut config = config;
    gmpq::search::Recipe::from(a.recipe).apply(&mut config);
    if let Some(v) = a.alpha_lr {
        config.alpha_lr = v;
    }
    if let Some(v) = a.dual_rate {
        config.dual_rate = v;
    }
    if let Some(v) = a.alpha_optimizer {
        config.alpha_optimizer = v.into();
    }
    if let Some(v) = a.alpha_frozen_epochs {
        config.alpha_frozen_epochs = v;
    }
    if let Some(v) = a.budget_mode {
        config.budget_mode = v.into();
    }
    if let Some(v) = a.budget_penalty {
        anyhow::ensure!(
            v.is_finite() && v > 0.0,
            "--budget-penalty {v}: must be a positive number"
        );
        config.budget_penalty = v;
    }
    if let Some(t) = &a.temperature {
        let (start, end) = t
            .split_once(':')
            .and_then(|(s, e)| Some((s.parse::<f64>().ok()?, e.parse::<f64>().ok()?)))
            .filter(|(s, e)| *s > 0.0 && *e > 0.0)
            .with_context(|| {
                format!("--temperature {t}: expected START:END, both positive (e.g. 1:0.2)")
            })?;
        config.temperature = gmpq::search::TemperatureSchedule { start, end };
    }
    if let Some(v) = a.extraction {
        config.extraction = v.into();
    }
    if config.alpha_frozen_epochs >= config.epochs {
        bail!(
            "--alpha-frozen-epochs {} leaves α no epoch to move in a {}-epoch search",
            config.alpha_frozen_epochs,
            config.epochs
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let _lock = gmpq::checkpoint::DirLock::acquire(&a.out)?;
    if a.method == super::SearchMethodArg::Hawq {
        return hawq_cmd(&a, &config, proxy, &train_indices, &targets, device);
    }
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let bars = Bars {
        bar: Mutex::new(None),
    };
    // Policies already written by an interrupted run of the same command are kept, and only
    // the missing targets are searched again.
    let single = targets.len() <= 1;
    let suffix_of = |t: &Option<Target>| match (t, single) {
        (_, true) | (None, _) => String::new(),
        (Some(t), false) => format!("-{t}"),
    };
    let mut remaining = Vec::new();
    for t in &targets {
        let path = a.out.join(format!("policy{}.json", suffix_of(&Some(*t))));
        if path.is_file() {
            println!(
                "{}: exists, kept (delete it to search this target again)",
                path.display()
            );
        } else {
            remaining.push(*t);
        }
    }
    if !targets.is_empty() && remaining.is_empty() {
        return Ok(());
    }
    if remaining.len() <= 1 {
        config.warmup_epochs = 0;
    }
    let results = search::search(SearchJob {
        teacher: a.teacher.clone(),
        proxy,
        train_indices: train_indices.clone(),
        val_indices,
        config: config.clone(),
        targets: remaining,
        device,
        progress: &bars,
        state_dir: Some(a.out.clone()),
    })?;
    if let Ok(mut b) = bars.bar.lock() {
        if let Some(bar) = b.take() {
            bar.finish_and_clear();
        }
    }
    let mut log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.out.join("search-log.jsonl"))
        .with_context(|| format!("writing {}", a.out.display()))?;
    let mut summary = Vec::new();
    let teacher_ck = gmpq::checkpoint::Checkpoint::load(&a.teacher)?;
    for r in &results {
        let suffix = suffix_of(&r.target);
        let mut policy = r.policy.clone();
        let totals = policy.totals.clone().context("policy totals")?;
        policy.meta = Some(serde_json::json!({
            "method": if config.attribution_weight == 0.0 { "edmips" } else { "gmpq" },
            "target": r.target,
            "argmax_policy_bops": r.argmax.totals.as_ref().map(|t| t.bops),
            "alpha": r.alpha,
            "search": config,
            "proxy": format!("{spec} ({} images, subset seed {})", train_indices.len(), a.subset.subset_seed),
            "teacher": a.teacher,
            "model_config": teacher_ck.meta.model,
            "threads": tch::get_num_threads(),
            "teacher_proxy_val_top1": r.teacher_val_top1,
            "cost": gmpq::policy::PolicyCost { wall_seconds: r.seconds, images_processed: r.images as u64 },
            "command": command_line,
        }));
        let path = a.out.join(format!("policy{suffix}.json"));
        policy.save(&path)?;
        for l in &r.log {
            writeln!(log_file, "{}", serde_json::to_string(l)?)?;
        }
        gmpq::report::bit_allocation_svg(
            &[(
                if config.attribution_weight == 0.0 {
                    "EdMIPS"
                } else {
                    "GMPQ"
                },
                &policy,
            )],
            &a.out.join(format!("bits{suffix}.svg")),
        )?;
        let [img, t, s] = &r.heatmaps;
        gmpq::report::heatmaps_png(
            img,
            &teacher_ck.meta.eval_pipeline.normalize,
            &[t, s],
            &a.out.join(format!("attribution{suffix}.png")),
        )?;
        let last = r.log.last();
        if !a.json {
            println!(
            "{}: {:.4} G BOPs, compression {:.2}x, size {:.3} MB{}; proxy top-1 (argmax, before fine-tuning) {:.2}%, teacher {:.2}%; search {:.0} s, {} images",
            path.display(),
            totals.bops as f64 / 1e9,
            totals.compression,
            totals.size_mb,
            r.target.map(|t| format!(" (target {t})")).unwrap_or_default(),
            last.map_or(0.0, |l| l.argmax_proxy_top1),
            r.teacher_val_top1,
            r.seconds,
            r.images
        );
        }
        summary.push(serde_json::json!({"policy": path, "totals": totals, "target": r.target, "seconds": r.seconds, "images": r.images}));
    }
    // Every policy is on disk: the per-epoch snapshots have done their job.
    search::remove_snapshots(&a.out);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// `gmpq search --method hawq`: sensitivities of the teacher, one knapsack policy per target.
fn hawq_cmd(
    a: &SearchArgs,
    config: &SearchConfig,
    proxy: Arc<dyn ImageSource>,
    train_indices: &[usize],
    targets: &[Target],
    device: tch::Device,
) -> Result<()> {
    if targets.is_empty() {
        bail!("--method hawq needs a budget (--target-compression, --target-bops, --target-size-mb or --pareto)");
    }
    let n = a.hawq_images.clamp(1, train_indices.len().max(1));
    let hawq_cfg = gmpq::search::hawq::HawqConfig {
        candidates: config.candidates.clone(),
        samples: a.hawq_samples,
    };
    let r = gmpq::search::hawq::run(
        &a.teacher,
        proxy,
        &train_indices[..n.min(train_indices.len())],
        targets,
        &hawq_cfg,
        device,
    )?;
    let teacher_ck = gmpq::checkpoint::Checkpoint::load(&a.teacher)?;
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let single = targets.len() == 1;
    let mut summary = Vec::new();
    for (t, policy) in &r.policies {
        let mut policy = policy.clone();
        policy.meta = Some(serde_json::json!({
            "method": "hawq",
            "target": t,
            "hawq": { "settings": hawq_cfg, "sensitivities": r.sensitivities },
            "teacher": a.teacher,
            "model_config": teacher_ck.meta.model,
            "threads": tch::get_num_threads(),
            "cost": gmpq::policy::PolicyCost { wall_seconds: r.seconds, images_processed: r.images as u64 },
            "command": command_line,
        }));
        let suffix = if single {
            String::new()
        } else {
            format!("-{t}")
        };
        let path = a.out.join(format!("policy{suffix}.json"));
        policy.save(&path)?;
        let totals = policy.totals.clone().context("policy totals")?;
        if !a.json {
            println!(
            "{}: HAWQ under {t}: {:.4} G BOPs, compression {:.2}x, size {:.3} MB; analysis {:.0} s on {} images",
            path.display(),
            totals.bops as f64 / 1e9,
            totals.compression,
            totals.size_mb,
            r.seconds,
            r.images
        );
        }
        summary.push(serde_json::json!({ "policy": path, "target": t, "totals": totals }));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// `gmpq extract`: a policy from a finished search's saved α, by another rule or budget.
pub fn extract_cmd(a: ExtractArgs) -> Result<()> {
    let path = if a.run.is_dir() {
        a.run.join("policy.json")
    } else {
        a.run.clone()
    };
    let searched = gmpq::policy::Policy::load(&path)?;
    let meta = searched
        .meta
        .clone()
        .with_context(|| format!("{}: no meta (not a gmpq search policy)", path.display()))?;
    // The geometry: recorded by gmpq search since this version; else the teacher's checkpoint.
    let model: gmpq::model::ModelConfig = match meta.get("model_config") {
        Some(m) if !m.is_null() => serde_json::from_value(m.clone())
            .with_context(|| format!("{}: malformed meta.model_config", path.display()))?,
        _ => {
            let teacher = meta["teacher"].as_str().with_context(|| {
                format!("{}: no meta.model_config or meta.teacher", path.display())
            })?;
            gmpq::checkpoint::Checkpoint::load(std::path::Path::new(teacher))
                .with_context(|| {
                    format!(
                        "{}: reading the search's teacher for the model geometry",
                        path.display()
                    )
                })?
                .meta
                .model
        }
    };
    let target = parse_target(
        a.target_bops.as_deref(),
        a.target_compression,
        a.target_size_mb,
    )?;
    // Policies written before the rule was recorded were extracted by argmax + repair.
    let rule: gmpq::search::ExtractionRule = match a.rule {
        Some(r) => r.into(),
        None => serde_json::from_value(meta["search"]["extraction"].clone())
            .unwrap_or(gmpq::search::ExtractionRule::ArgmaxRepair),
    };
    let policy = search::re_extract(&searched, &model, rule, target)?;
    let target_name = policy
        .meta
        .as_ref()
        .and_then(|m| serde_json::from_value::<Option<Target>>(m["target"].clone()).ok())
        .flatten()
        .map_or("none".to_string(), |t| t.to_string());
    let out = a.out.clone().unwrap_or_else(|| {
        path.parent()
            .unwrap_or(std::path::Path::new("."))
            .join(format!("policy-{rule}-{target_name}.json"))
    });
    policy.save(&out)?;
    let totals = policy.totals.clone().context("policy totals")?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "policy": out, "rule": rule.to_string(), "target": target_name, "totals": totals,
            }))?
        );
    } else {
        println!(
            "{}: {rule} under {target_name}: {:.4} G BOPs, compression {:.2}x, size {:.3} MB",
            out.display(),
            totals.bops as f64 / 1e9,
            totals.compression,
            totals.size_mb
        );
    }
    Ok(())
}

pub fn attribution_cmd(a: AttributionArgs, device: tch::Device) -> Result<()> {
    let mut checkpoints = vec![a.checkpoint.clone()];
    checkpoints.extend(a.compare.clone());
    let n = attribution_grid(&checkpoints, &a.data, a.count, &a.out, device)?;
    println!(
        "wrote {} ({n} images × {} maps)",
        a.out.display(),
        checkpoints.len()
    );
    Ok(())
}

/// Writes a PNG grid of CAM heatmaps: one row per test image of `data` (stratified), one
/// column per checkpoint after the image itself. Returns the number of images.
pub fn attribution_grid(
    checkpoints: &[std::path::PathBuf],
    data: &str,
    count: usize,
    out: &std::path::Path,
    device: tch::Device,
) -> Result<usize> {
    let spec = super::commands::parse_spec(data)?;
    let data = spec.load(Split::Test)?;
    let idx = stratified_subset(
        data.as_ref(),
        &SubsetSpec::limited(Some(count.min(data.len())), 0),
    )?;
    let nets = checkpoints
        .iter()
        .map(|c| gmpq::quant::load(c, device).with_context(|| format!("loading {}", c.display())))
        .collect::<Result<Vec<_>>>()?;
    let pipeline = nets
        .first()
        .context("no checkpoint")?
        .0
        .meta
        .eval_pipeline
        .clone();
    let mut loader = gmpq::data::DataLoader::new(
        data,
        &idx,
        Arc::new(pipeline.clone()),
        gmpq::data::LoaderConfig {
            batch_size: idx.len().max(1),
            ..Default::default()
        },
        0,
    )?;
    let x = loader
        .next()
        .context("no images")??
        .images
        .to_device(device);
    let maps: Vec<tch::Tensor> = nets
        .iter()
        .map(|(_, n)| {
            tch::no_grad(|| {
                let f = n.net.features(&x, false);
                let logits = n.net.head(&f);
                gmpq::attribution::cam(&f, n.net.fc_weight(), &gmpq::attribution::top1(&logits))
            })
        })
        .collect();
    let refs: Vec<&tch::Tensor> = maps.iter().collect();
    gmpq::report::heatmaps_png(&x, &pipeline.normalize, &refs, out)?;
    Ok(idx.len())
}

//! The HTML page of a pipeline run (`report.html`): one self-contained page (SVG inline, PNG as data URIs)
//! built from whatever the run directory holds, so it also works for a partial run.

use super::{training_meta, Arm, PipelineError, RunLayout, RunRecord, RunSummary, StageStatus};
use crate::checkpoint::CheckpointMeta;
use crate::policy::Policy;
use crate::report as charts;
use crate::search::EpochLog;
use base64::Engine;
use html_escape::encode_text as esc;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn file_error(path: &Path, e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Read {
        path: path.into(),
        reason: e.to_string(),
    }
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}\
.warn{color:#a00;font-weight:bold}code,pre{background:#f6f6f6;font-size:90%}pre{padding:6px;white-space:pre-wrap;word-break:break-all}\
figure{margin:1em 0}figcaption{color:#555;font-size:90%}svg{max-width:100%;height:auto}\
.missing{color:#a00}";

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map_or("—".into(), |v| format!("{v:.digits$}{unit}"))
}

/// The per-epoch search log of the latest search in a folder (an interrupted and restarted
/// search appends; only the last pass counts).
fn search_log(dir: &Path) -> Vec<EpochLog> {
    let Ok(text) = std::fs::read_to_string(dir.join("search-log.jsonl")) else {
        return Vec::new();
    };
    let mut logs: Vec<EpochLog> = Vec::new();
    for line in text.lines() {
        if let Ok(l) = serde_json::from_str::<EpochLog>(line) {
            if logs.last().is_some_and(|p| l.epoch <= p.epoch) {
                logs.clear();
            }
            logs.push(l);
        }
    }
    logs
}

fn inline_svg(path: &Path) -> Result<String, PipelineError> {
    let svg = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    // The XML declaration is not allowed inside HTML.
    Ok(match svg.find("<svg") {
        Some(i) => svg[i..].to_string(),
        None => svg,
    })
}

fn png_img(path: &Path, alt: &str) -> Result<String, PipelineError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    Ok(format!(
        "<img alt=\"{}\" src=\"data:image/png;base64,{}\">",
        esc(alt),
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

fn figure(body: &str, caption: &str) -> String {
    format!(
        "<figure>{body}<figcaption>{}</figcaption></figure>\n",
        esc(caption)
    )
}

/// (label, training run) pairs whose per-epoch history the curves show.
fn training_runs(layout: &RunLayout, arms: &[Arm]) -> Vec<(String, CheckpointMeta)> {
    let mut runs = Vec::new();
    if let Ok(Some(m)) = training_meta(&layout.used_target_teacher()) {
        runs.push(("FP teacher (target)".to_string(), m));
    }
    for &arm in arms {
        if let Ok(Some(m)) = training_meta(&layout.finetune(arm)) {
            runs.push((format!("{} fine-tuned", arm.label()), m));
        }
    }
    runs
}

/// Writes `report.html` (and its chart files under `report/`) for a run directory and
/// returns the page's path.
pub fn write_run_report(run_dir: &Path) -> Result<PathBuf, PipelineError> {
    let layout = RunLayout::new(run_dir);
    let record = RunRecord::load(&layout.record())?.ok_or_else(|| {
        file_error(
            &layout.record(),
            "not found: is this a `gmpq pipeline` run directory?",
        )
    })?;
    let assets = layout.report_assets();
    std::fs::create_dir_all(&assets).map_err(|source| PipelineError::Write {
        path: assets.clone(),
        source,
    })?;
    let arms = record.arms.clone();
    let summary = RunSummary::collect(&layout, &arms)?;
    let mut page = String::new();
    let title = format!("gmpq run {}", run_dir.display());
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body>\n<h1>{t}</h1>\n",
        t = esc(&title)
    );

    results_table(&mut page, &summary);
    accuracy_section(&mut page, &summary, &assets)?;
    bits_section(&mut page, &layout, &arms, &assets)?;
    training_section(&mut page, &layout, &arms, &assets)?;
    let searches = search_section(&mut page, &layout, &arms, &assets)?;
    heatmap_section(&mut page, &layout, &arms, &searches)?;
    stages_section(&mut page, &record);
    let out = layout.report();
    crate::files::write_atomic(&out, page.as_bytes()).map_err(|source| PipelineError::Write {
        path: out.clone(),
        source,
    })?;
    Ok(out)
}

/// The headline table: every arm next to the full-precision teacher, the chosen one marked.
fn results_table(page: &mut String, summary: &RunSummary) {
    page.push_str("<h2>Results on the target test set</h2>\n<table><tr><th>arm</th><th>policy BOPs (G)</th><th>compression</th><th>size (MB)</th><th>search time</th><th>search images</th><th>fine-tune epochs</th><th>top-1</th><th>top-5</th><th>top-1 vs FP</th><th>validation top-1</th></tr>\n");
    let _ = writeln!(
        page,
        "<tr><td>full precision (target teacher)</td><td>{}</td><td>1×</td><td>{}</td><td>—</td><td>—</td><td>—</td><td>{}</td><td>{}</td><td>—</td><td>—</td></tr>",
        opt(summary.fp_bops.map(|b| b / 1e9), 3, ""),
        opt(summary.fp_size_mb, 3, ""),
        opt(summary.fp_top1, 2, "%"),
        opt(summary.fp_top5, 2, "%"),
    );
    for a in &summary.arms {
        let delta = match (a.top1, summary.fp_top1) {
            (Some(q), Some(f)) => format!("{:+.2} pt", q - f),
            _ => "—".into(),
        };
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{delta}</td><td>{}</td></tr>",
            if summary.chosen == Some(a.arm) {
                format!("<b>{} (chosen)</b>", a.arm.label())
            } else {
                a.arm.label().to_string()
            },
            opt(a.bops.map(|b| b / 1e9), 4, ""),
            opt(a.compression, 2, "×"),
            opt(a.size_mb, 3, ""),
            opt(a.search_seconds, 0, " s"),
            a.search_images.map_or("—".into(), |n| n.to_string()),
            a.finetune_epochs,
            opt(a.top1, 2, "%"),
            opt(a.top5, 2, "%"),
            opt(a.val_top1, 2, "%"),
        );
    }
    if let Some(arm) = summary.chosen {
        let _ = writeln!(
            page,
            "<p>Chosen model: <b>{}</b>, chosen on the target training images held out for \
             validation (never trained on): the simplest policy for the budget unless the arm \
             best there leads it beyond the noise (the choice line below). Test top-1 is \
             reported for every arm and never used to choose.</p>",
            arm.label()
        );
    }
    page.push_str("</table>\n<p>BOPs count the quantized layers (MACs·b<sub>w</sub>·b<sub>a</sub>); compression is full-precision BOPs (all layers at 32×32 bits) over policy BOPs; size counts quantized weights at their bits and the full-precision stem and head at 32 bits (MB = 10<sup>6</sup> bytes). Search time is wall time on this machine, including the per-epoch evaluation of the argmax policy.</p>\n");
    if let Some(choice) = &summary.choice {
        let _ = writeln!(page, "<p>choice: {}</p>", esc(&choice.reason));
        if let Some(w) = &choice.warning {
            let _ = writeln!(page, "<p class=\"warn\">{}</p>", esc(w));
        }
    }
    if let Some(shipped) = &summary.shipped {
        let class = if shipped.disagrees() {
            " class=\"warn\""
        } else {
            ""
        };
        let _ = writeln!(page, "<p{class}>{}</p>", esc(&shipped.line()));
    }
}

/// Accuracy against BOPs, one point per arm.
fn accuracy_section(
    page: &mut String,
    summary: &RunSummary,
    assets: &Path,
) -> Result<(), PipelineError> {
    let points: Vec<charts::CostPoint> = summary
        .arms
        .iter()
        .filter_map(|a| {
            Some(charts::CostPoint {
                label: a.arm.label().into(),
                bops: a.bops?,
                top1: a.top1?,
            })
        })
        .collect();
    if !points.is_empty() {
        let path = assets.join("accuracy-vs-bops.svg");
        charts::accuracy_vs_bops_svg(&points, summary.fp_top1, &path)?;
        page.push_str("<h2>Accuracy vs BOPs</h2>\n");
        page.push_str(&figure(
            &inline_svg(&path)?,
            "Fine-tuned top-1 on the target test set against policy BOPs, one point per arm; dashed: the full-precision teacher.",
        ));
    }
    Ok(())
}

/// Each arm's bits per layer.
fn bits_section(
    page: &mut String,
    layout: &RunLayout,
    arms: &[Arm],
    assets: &Path,
) -> Result<(), PipelineError> {
    let policies: Vec<(Arm, Policy)> = arms
        .iter()
        .filter_map(|&a| Policy::load(&layout.policy(a)).ok().map(|p| (a, p)))
        .collect();
    if !policies.is_empty() {
        page.push_str("<h2>Bits per layer</h2>\n");
        for (arm, policy) in &policies {
            let path = assets.join(format!("bits-{}.svg", arm.name()));
            charts::bit_allocation_svg(&[(arm.label(), policy)], &path)?;
            page.push_str(&figure(
                &inline_svg(&path)?,
                &format!(
                    "{}: weight (dark) and activation (light) bits of every quantized layer. The stem and the classifier are outside the policy and counted at 32 bits: with fake-quant numerics both compute in float; with integer numerics (the fine-tuned checkpoints and chosen.onnx by default) the stem is an integer conv with 7-bit weights on the 8-bit image and the classifier reads the dequantized features in float.",
                    arm.label()
                ),
            ));
        }
    }
    Ok(())
}

/// The fine-tunings' (and teachers') curves on the target data.
fn training_section(
    page: &mut String,
    layout: &RunLayout,
    arms: &[Arm],
    assets: &Path,
) -> Result<(), PipelineError> {
    let runs = training_runs(layout, arms);
    if !runs.is_empty() {
        page.push_str("<h2>Training curves (target data)</h2>\n");
        let series = |f: fn(&crate::checkpoint::EpochMetrics) -> f64| -> Vec<charts::Series> {
            runs.iter()
                .map(|(label, m)| charts::Series {
                    label: label.clone(),
                    points: m.history.iter().map(|h| (h.epoch as f64, f(h))).collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect()
        };
        for (file, title, y, f, caption) in [
            (
                "test-top1.svg",
                "test top-1 per epoch",
                "top-1 (%)",
                (|h| h.test_top1) as fn(&crate::checkpoint::EpochMetrics) -> f64,
                "Top-1 on the target test set after each epoch.",
            ),
            (
                "train-loss.svg",
                "training loss per epoch",
                "cross-entropy",
                |h| h.train_loss,
                "Mean training cross-entropy of each epoch (with augmentation).",
            ),
        ] {
            let s = series(f);
            if s.is_empty() {
                continue;
            }
            let path = assets.join(file);
            charts::line_chart_svg(title, "epoch", y, &s, &path)?;
            page.push_str(&figure(&inline_svg(&path)?, caption));
        }
    }
    Ok(())
}

/// The searches' curves on the proxy data; returns the searched arms with their logs.
fn search_section(
    page: &mut String,
    layout: &RunLayout,
    arms: &[Arm],
    assets: &Path,
) -> Result<Vec<(Arm, Vec<EpochLog>)>, PipelineError> {
    let searches: Vec<(Arm, Vec<EpochLog>)> = arms
        .iter()
        .filter(|a| a.searched())
        .map(|&a| (a, search_log(&layout.search(a))))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if !searches.is_empty() {
        page.push_str("<h2>Search (proxy data)</h2>\n");
        for (file, title, y, f, caption) in [
            (
                "search-ce.svg",
                "supernet cross-entropy per epoch",
                "cross-entropy",
                (|l| l.ce) as fn(&EpochLog) -> f64,
                "Mean cross-entropy of the supernet on the proxy training images.",
            ),
            (
                "search-rank.svg",
                "teacher/student attribution rank correlation",
                "Spearman ρ",
                |l| l.rank_correlation,
                "Spearman correlation between the teacher's and the supernet's attribution maps on proxy images: what the attribution loss preserves.",
            ),
            (
                "search-top1.svg",
                "argmax policy top-1 on held-out proxy images",
                "top-1 (%)",
                |l| l.argmax_proxy_top1,
                "The argmax policy's network (supernet weights, BN re-estimated, no fine-tuning) on held-out proxy images.",
            ),
        ] {
            let s: Vec<charts::Series> = searches
                .iter()
                .map(|(a, l)| charts::Series {
                    label: a.label().into(),
                    points: l.iter().map(|e| (e.epoch as f64, f(e))).collect(),
                })
                .collect();
            let path = assets.join(file);
            charts::line_chart_svg(title, "epoch", y, &s, &path)?;
            page.push_str(&figure(&inline_svg(&path)?, caption));
        }
    }
    Ok(searches)
}

/// The attribution heatmaps of the searches and of the fine-tuned arms.
fn heatmap_section(
    page: &mut String,
    layout: &RunLayout,
    arms: &[Arm],
    searches: &[(Arm, Vec<EpochLog>)],
) -> Result<(), PipelineError> {
    let mut maps = Vec::new();
    for (a, _) in searches {
        let p = layout.search(*a).join("attribution.png");
        if p.exists() {
            maps.push((p, format!("{}: proxy images; columns: image, FP teacher, supernet at the end of the search.", a.label())));
        }
    }
    if layout.target_attribution().exists() {
        let labels: Vec<&str> = arms
            .iter()
            .filter(|a| layout.finetune(**a).exists())
            .map(|a| a.label())
            .collect();
        maps.push((
            layout.target_attribution(),
            format!(
                "Target test images; columns: image, FP teacher, then the fine-tuned {}.",
                labels.join(", ")
            ),
        ));
    }
    if !maps.is_empty() {
        page.push_str("<h2>Attribution (CAM) heatmaps</h2>\n");
        for (p, caption) in maps {
            page.push_str(&figure(&png_img(&p, &caption)?, &caption));
        }
    }
    Ok(())
}

/// Every stage with its wall time and command, the run's command and settings.
fn stages_section(page: &mut String, record: &RunRecord) {
    page.push_str("<h2>Stages and commands</h2>\n<table><tr><th>stage</th><th>wall time</th><th>command</th></tr>\n");
    for s in &record.stages {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{:.0} s{}</td><td style=\"text-align:left\"><code>{}</code>{}</td></tr>",
            esc(&s.name),
            s.seconds,
            if s.status == StageStatus::Running {
                " (interrupted)"
            } else {
                ""
            },
            esc(&s.command),
            s.reused_from.as_ref().map_or(String::new(), |from| format!(
                "<br>copied from <code>{}</code>, where the same command ran on the same policy",
                esc(&from.display().to_string())
            ))
        );
    }
    let _ = write!(
        page,
        "</table>\n<p>The whole run:</p><pre>{}</pre>\n<h3>Settings</h3><pre>{}</pre>\n</body></html>\n",
        esc(&record.command),
        esc(&serde_json::to_string_pretty(&record.settings).unwrap_or_default())
    );
}

//! `gmpq search` and `gmpq attribution`.

use super::args::AttributionArgs;
use anyhow::Result;
use gmpq::search::{EpochLog, ExtractArgs, Extracted, SearchArgs, SearchProgress};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

/// The search's progress bar and epoch lines.
pub(super) struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub(super) fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }

    /// Clears the bar of the last phase.
    pub(super) fn finish(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish_and_clear();
            }
        }
    }
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
    let request = a.request(shell_words::join(std::env::args()))?;
    let bars = Bars::new();
    let outcome = request.run(device, &bars);
    bars.finish();
    let outcome = outcome?;
    if !gmpq::dist::is_main() {
        return Ok(()); // rank 0 reports
    }
    if a.json {
        // One JSON document on stdout, whether the policies were searched now or kept.
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "written": outcome.written, "kept": outcome.kept,
            }))?
        );
        return Ok(());
    }
    for path in &outcome.kept {
        println!(
            "{}: the same search finished here before, kept (delete it to search again)",
            path.display()
        );
    }
    for p in &outcome.written {
        println!("{}", p.one_line());
    }
    Ok(())
}

/// `gmpq extract`: a policy from a finished search's saved α, by another rule or budget, or
/// the ranked choice among its candidates.
pub fn extract_cmd(a: ExtractArgs) -> Result<()> {
    let extracted = a.run()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&extracted)?);
        return Ok(());
    }
    match extracted {
        Extracted::Rule {
            policy,
            rule,
            target,
            totals,
        } => println!(
            "{}: {rule} under {target}: {:.4} G BOPs, compression {:.2}x, size {:.3} MB",
            policy.display(),
            totals.bops as f64 / 1e9,
            totals.compression,
            totals.size_mb
        ),
        Extracted::Ranked {
            policy, ranking, ..
        } => {
            for (i, c) in ranking.candidates.iter().enumerate() {
                println!(
                    "{} {:<40} {:>8.2}x  calibrated top-1 {:>6.2}%  log π(α) {:>8.2}",
                    if i == ranking.chosen { "*" } else { " " },
                    c.source,
                    c.compression,
                    c.val_top1,
                    c.alpha_log_prob
                );
            }
            println!(
                "{}: kept candidate {} of {} (best calibrated top-1 on {} held-out proxy images)",
                policy.display(),
                ranking.chosen + 1,
                ranking.candidates.len(),
                ranking.val_images
            );
        }
    }
    Ok(())
}

pub fn attribution_cmd(a: AttributionArgs, device: tch::Device) -> Result<()> {
    let mut checkpoints = vec![a.checkpoint.clone()];
    checkpoints.extend(a.compare.clone());
    let data = gmpq::data::parse_spec_flag("--data", &a.data)?;
    let n = gmpq::pipeline::attribution_grid(&checkpoints, &data, a.count, &a.out, device)?;
    println!(
        "wrote {} ({n} images × {} maps)",
        a.out.display(),
        checkpoints.len()
    );
    Ok(())
}

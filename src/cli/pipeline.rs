//! `gmpq pipeline`, `gmpq demo`: parse, run the library's pipeline, print its summary.

use super::progress::TrainBars;
use super::search::Bars;
use super::{DemoArgs, PipelineArgs};
use anyhow::Result;
use gmpq::pipeline::{PipelineSettings, RunEvents, RunLayout, RunSummary};
use gmpq::search::SearchProgress;

/// Prints each stage's command and outcome, and draws training and search progress.
pub(super) struct PrintedEvents {
    train: TrainBars,
    search: Bars,
}

impl PrintedEvents {
    pub(super) fn new() -> Self {
        Self {
            train: TrainBars::new(),
            search: Bars::new(),
        }
    }
}

impl RunEvents for PrintedEvents {
    fn stage_started(&self, name: &str, command: &str) {
        println!("[{name}] {command}");
    }
    fn stage_skipped(&self, name: &str, why: &str) {
        println!("[{name}] {why}");
    }
    fn stage_finished(&self, name: &str, outcome: &str) {
        self.search.finish();
        println!("[{name}] {outcome}");
    }
    fn message(&self, line: &str) {
        println!("{line}");
    }
    fn train_progress(&self) -> &dyn gmpq::train::Progress {
        &self.train
    }
    fn search_progress(&self) -> &dyn SearchProgress {
        &self.search
    }
}

/// The library's settings of `gmpq pipeline`'s flags.
fn settings(a: PipelineArgs) -> PipelineSettings {
    PipelineSettings {
        model: a.model,
        width: a.width,
        proxy: a.proxy,
        target: a.target,
        target_limit: a.target_limit,
        target_test_limit: a.target_test_limit,
        target_holdout: (a.target_holdout > 0).then_some(a.target_holdout),
        target_compression: a.budget.target_compression,
        target_bops: a.budget.target_bops,
        target_size_mb: a.budget.target_size_mb,
        teacher: a.teacher,
        target_teacher: a.target_teacher,
        baseline: a.baseline,
        teacher_epochs: a.teacher_epochs,
        target_teacher_epochs: a.target_teacher_epochs,
        search_epochs: a.search_epochs,
        target_search_epochs: a.target_search_epochs,
        search_step_epochs: a.search_step_epochs,
        finetune_epochs: a.finetune_epochs,
        finetune_lr: a.finetune_lr,
        attribution_weight: a.attribution_weight,
        p: a.p,
        recipe: a.recipe,
        w_bits: a.bits.w_bits,
        a_bits: a.bits.a_bits,
        hflip: a.hflip,
        proxy_hflip: a.proxy_hflip,
        seed: a.seed,
        subset_seed: a.subset_seed,
        numerics: a.numerics,
        out: a.out,
        reuse_from: a.reuse_from,
    }
}

/// Runs `settings`, printing stages as they go (to stderr with `json`) and the summary last.
pub(super) fn run_pipeline(
    settings: &PipelineSettings,
    json: bool,
    device: tch::Device,
) -> Result<()> {
    // --json: the summary is the only thing on stdout.
    let quiet = if json {
        super::StdoutToStderr::new()
    } else {
        None
    };
    let events = PrintedEvents::new();
    let command = shell_words::join(std::env::args());
    let outcome = gmpq::pipeline::run(settings, &command, device, &events)?;
    drop(quiet);
    print_summary(
        &outcome.summary,
        &outcome.report,
        &RunLayout::new(&settings.out),
        outcome.seconds,
        json,
    )
}

pub fn pipeline_cmd(a: PipelineArgs, device: tch::Device) -> Result<()> {
    let json = a.json;
    run_pipeline(&settings(a), json, device)
}

pub fn demo_cmd(a: DemoArgs, device: tch::Device) -> Result<()> {
    run_pipeline(&PipelineSettings::demo(a.out), a.json, device)
}

fn print_summary(
    s: &RunSummary,
    page: &std::path::Path,
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
    let validated = s.arms.iter().any(|a| a.val_top1.is_some());
    let val_column = |v: Option<f64>| {
        if validated {
            format!(" {:>9}", pct(v))
        } else {
            String::new()
        }
    };
    println!();
    println!(
        "{:<20} {:>10} {:>12} {:>10} {:>10} {:>9}{}",
        "arm",
        "BOPs (G)",
        "compression",
        "size MB",
        "search",
        "top-1",
        if validated { "   val top-1" } else { "" }
    );
    println!(
        "{:<20} {:>10} {:>12} {:>10} {:>10} {:>9}",
        "FP",
        s.fp_bops.map_or("—".into(), |b| format!("{:.4}", b / 1e9)),
        "1.00x",
        s.fp_size_mb.map_or("—".into(), |v| format!("{v:.3}")),
        "—",
        pct(s.fp_top1)
    );
    for a in &s.arms {
        let label = if s.chosen == Some(a.arm) {
            format!("{} (chosen)", a.arm.label())
        } else {
            a.arm.label().to_string()
        };
        println!(
            "{:<20} {:>10} {:>12} {:>10} {:>10} {:>9}{}",
            label,
            a.bops.map_or("—".into(), |b| format!("{:.4}", b / 1e9)),
            a.compression.map_or("—".into(), |c| format!("{c:.2}x")),
            a.size_mb.map_or("—".into(), |v| format!("{v:.3}")),
            a.search_seconds.map_or("—".into(), |v| format!("{v:.0} s")),
            pct(a.top1),
            val_column(a.val_top1)
        );
    }
    if let Some(arm) = s.chosen {
        println!(
            "\nchosen: {} (best top-1 on the held-out validation images; test top-1 is not used to choose)",
            arm.label()
        );
        if layout.chosen_onnx().is_file() {
            println!(
                "exported: {} and {}",
                layout.chosen_onnx().display(),
                layout.chosen_packed().display()
            );
        }
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

#[cfg(test)]
mod tests {
    use super::super::Cli;
    use super::*;
    use clap::Parser;
    use gmpq::pipeline::Arm;

    /// pipeline.json records the values used, typed: numbers, lists and arm names; the
    /// defaults of the flags are the library's.
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
        let out = a.out.clone();
        let settings = settings(a);
        let s = settings.record();
        assert_eq!(s["finetune_lr"], serde_json::json!(0.01));
        assert_eq!(s["w_bits"], serde_json::json!([4, 2, 2]));
        assert_eq!(s["a_bits"], serde_json::json!([2, 3, 4, 6]));
        assert_eq!(s["recipe"], "scarce");
        assert!(s.get("baseline").is_none() && s.get("bits").is_none());
        assert_eq!(settings.candidates().unwrap().weight, vec![2, 4]);
        // Every default of the flags is the library's own.
        let library = PipelineSettings {
            baseline: settings.baseline.clone(),
            w_bits: vec![4, 2, 2],
            ..PipelineSettings::new("bundled:mnist:500", "bundled:fashion-mnist", out)
        };
        assert_eq!(settings, library);
        // GMPQ always runs: it is not a baseline; bits outside 2..=16 are refused.
        for bad in [["--baseline", "gmpq"], ["--w-bits", "1,4"]] {
            let mut v = argv[..6].to_vec();
            v.extend(bad);
            assert!(Cli::try_parse_from(v).is_err(), "{bad:?} accepted");
        }
    }
}

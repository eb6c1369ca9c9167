//! The charts a person looks at: per-layer bit allocation, accuracy-vs-BOPs and training
//! curves (SVG), attribution heatmaps (PNG). They draw plain values and know nothing of runs;
//! the run page that embeds them is `pipeline::write_run_report`.

mod charts;

pub use charts::{
    accuracy_vs_bops_svg, bit_allocation_svg, grouped_bars_svg, heatmaps_png, line_chart_svg, Bars,
    CostPoint, Series,
};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {reason}")]
    Write { path: String, reason: String },
}

fn werr(path: &std::path::Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

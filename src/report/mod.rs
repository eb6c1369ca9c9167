//! What a person looks at: per-layer bit allocation, accuracy-vs-BOPs and training-curve
//! charts, attribution heatmaps, and the HTML page of a pipeline run that embeds them.

mod charts;
mod html;

pub use charts::{
    accuracy_vs_bops_svg, bit_allocation_svg, grouped_bars_svg, heatmaps_png, line_chart_svg, Bars,
    CostPoint, Series,
};
pub use html::write_run_report;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {reason}")]
    Write { path: String, reason: String },
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
}

fn werr(path: &std::path::Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

//! The command line: `args` (the `Cli` and the flags it owns), `commands` (one function per
//! command: parse, call the library, print), and the printing of the long-running commands.
//! Files use their siblings in one direction only (commands → deploy/pipeline/search/study
//! → progress, args).

mod args;
mod commands;
mod deploy;
mod pipeline;
mod progress;
mod search;
mod study;

pub use args::{init_logging, Cli};
pub use commands::run;

/// The error and its causes on one line, outermost first, leaving out a cause whose text the
/// line already ends with (a typed error that shows its source, e.g. `PATH: OS error`, and
/// the same OS error as its cause), and a cause's leading `X: ` when the line already ends
/// with X (`loading PATH` then `PATH: reason`).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let mut text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        // "loading X" then "X: reason": say X once.
        if let Some((head, rest)) = text.split_once(": ") {
            if !head.is_empty() && line.ends_with(head) {
                text = rest.to_string();
            }
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

//! The `gmpq` command line: a thin layer over the library.

mod cli;

use clap::Parser;

fn main() {
    // Before libtorch's OpenMP runtime initialises: make idle workers sleep, not spin.
    gmpq::runtime::ensure_passive_omp();
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    if let Err(err) = cli::run(args) {
        // One line: the error and its causes, outermost first.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

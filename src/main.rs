//! The `gmpq` command line: a thin layer over the library.

mod cli;

use clap::Parser;

fn main() {
    // `gmpq … | head` should end quietly, as other CLI tools do, not panic on a closed pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Before libtorch's OpenMP runtime initialises: bound how long idle workers spin.
    gmpq::runtime::ensure_bounded_omp_spinning();
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    if let Err(err) = cli::run(args) {
        eprintln!("error: {}", cli::one_line(&err));
        std::process::exit(1);
    }
}

//! `vgg16`: the command-line edge over the `vgg16_cpu` library. Parses
//! flags (clap), sets the thread pool, runs a library job with a progress
//! observer, and turns errors into messages naming the file and problem.

mod cli;

fn main() {
    cli::main()
}

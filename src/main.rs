//! The `rollbox` command; everything it does lives in the library, see `cli`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}

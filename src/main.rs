//! The `cellmorph` command-line tool.

mod cli;

use std::process::ExitCode;

use clap::{Command, CommandFactory, FromArgMatches};

/// Every option that takes a value accepts a negative number (`--batch-size
/// -1` then gets "invalid value" instead of "unexpected argument"), in every
/// subcommand.
fn negative_numbers(cmd: Command) -> Command {
    cmd.mut_args(|a| {
        if a.get_action().takes_values() {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    })
    .mut_subcommands(negative_numbers)
}

fn main() -> ExitCode {
    let matches = negative_numbers(cli::Cli::command()).get_matches();
    let args = match cli::Cli::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

//! One module per subcommand, over the shared writer [`crate::operation::Operation`]; each imports
//! what it shares from the modules below `cmd`, never from here.

pub mod download;
pub mod factory;
pub mod heal;
pub mod install;
pub mod pack;
pub mod rollback;
pub mod selftest;
pub mod serve;
pub mod status;
pub mod verify;

use crate::cli::{Cli, Command};
use anyhow::Result;

use crate::output::Output;

/// Run the parsed command line.
pub fn run(cli: &Cli) -> Result<Output> {
    crate::failpoint::updater_fault("run", crate::proven::DIR);
    match &cli.command {
        Command::Download(args) => download::run(&cli.global, args),
        Command::Status => status::run(&cli.global),
        Command::Install(args) => install::run(&cli.global, args),
        Command::Rollback(args) => rollback::run(&cli.global, args),
        Command::Heal(args) => heal::run(&cli.global, args),
        Command::Serve(args) => serve::run(&cli.global, args),
        Command::Pack(args) => pack::run(&cli.global, args),
        Command::Factory => factory::run(&cli.global),
        Command::Verify(args) => verify::run(&cli.global, args),
        Command::SelfTest(args) => selftest::run(&cli.global, args),
    }
}

use clap::Parser;
use tope_ota::{cli::Cli, cmd, logging, report_failure, signals};

fn main() {
    let cli = Cli::parse();
    logging::init(cli.global.verbose, cli.global.quiet);
    signals::install();
    let code = match cmd::run(&cli) {
        Ok(out) => {
            if cli.global.json {
                println!("{}", out.json);
            } else if !cli.global.quiet {
                print!("{}", out.human);
            }
            out.exit
        }
        Err(err) => report_failure(&cli.global, &err),
    };
    std::process::exit(code);
}

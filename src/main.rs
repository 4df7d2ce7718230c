use tope_ota::{cli, cmd, dispatch, logging, report_failure, signals};

fn main() {
    // First, while there is one thread: this may exec the proven updater instead.
    dispatch::start();
    let cli = cli::parse();
    logging::init(cli.global.verbose, cli.global.quiet);
    dispatch::log_choice();
    signals::install();
    let code = match cmd::run(&cli) {
        Ok(out) => {
            // Not print!: a reader that went away (`status | head -1`) must not turn the end of
            // a run into a crash.
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            let _ = if cli.global.json {
                writeln!(stdout, "{}", out.json)
            } else if !cli.global.quiet {
                write!(stdout, "{}", out.human)
            } else {
                Ok(())
            };
            let _ = stdout.flush();
            out.exit
        }
        Err(err) => report_failure(&cli.global, &err),
    };
    dispatch::finish(code);
    std::process::exit(code);
}

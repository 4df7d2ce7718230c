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
            if cli.global.json {
                println!("{}", out.json);
            } else if !cli.global.quiet {
                print!("{}", out.human);
            }
            out.exit
        }
        Err(err) => report_failure(&cli.global, &err),
    };
    dispatch::finish(code == 0);
    std::process::exit(code);
}

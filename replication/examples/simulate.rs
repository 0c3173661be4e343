//! Runs the replication simulator over a range of seeds, or replays one with a trace.
//!
//! `simulate --seeds 0..100000` stops at the first failing seed (exit 1) and prints it with
//! the command that replays it; `simulate --seed 42 --trace` prints every event of seed 42.

use pyralog_replication::sim::{run, Bug, Options, Scenario};
use pyralog_replication::Preset;

fn main() {
    let mut options = Options::default();
    let mut seeds = 0..1000u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--seed" => {
                let seed = value().parse().unwrap_or_else(|_| usage("--seed takes a number"));
                seeds = seed..seed + 1;
            }
            "--seeds" => {
                let text = value();
                let (from, to) = text.split_once("..").unwrap_or_else(|| usage("--seeds takes FROM..TO"));
                let parse = |s: &str| s.parse::<u64>().unwrap_or_else(|_| usage("--seeds takes numbers"));
                seeds = parse(from)..parse(to);
            }
            "--replicas" => {
                options.replicas = Some(value().parse().unwrap_or_else(|_| usage("--replicas 3|5")))
            }
            "--bug" => options.bug = Some(Bug::parse(&value()).unwrap_or_else(|| usage("unknown --bug"))),
            "--no-faults" => options.faults = false,
            "--scenario" => {
                let scenario = Scenario::parse(&value()).unwrap_or_else(|| usage("unknown --scenario"));
                options.scenario = Some(scenario);
                options.faults = false;
                if scenario == Scenario::Figure8 {
                    options.replicas = Some(5);
                    options.preset = Some(Preset::Balanced);
                }
            }
            "--membership" => options.membership = Some(true),
            "--trace" => options.trace = true,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let (mut events, mut changes, mut gaps_us) = (0u64, 0usize, Vec::new());
    let (mut trims, mut logs_started) = (0usize, 0usize);
    let (count, started) = (seeds.end - seeds.start, std::time::Instant::now());
    for seed in seeds {
        match run(seed, &options) {
            Ok(outcome) => {
                events += outcome.events;
                changes += outcome.membership_changes;
                trims += outcome.trims;
                logs_started += outcome.logs_started;
                gaps_us.extend(outcome.leader_gap_us);
            }
            Err(failure) => {
                eprintln!("{failure}");
                std::process::exit(1);
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds passed, {events} events, {changes} membership changes, {trims} trims, \
         {logs_started} logs started past a leader's start, in {seconds:.1} s"
    );
    if !gaps_us.is_empty() {
        gaps_us.sort_unstable();
        let at = |q: usize| gaps_us[(gaps_us.len() - 1) * q / 100] as f64 / 1000.0;
        println!(
            "leader gap after a crash: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            at(50),
            at(99),
            at(100)
        );
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("simulate: {problem}\nusage: simulate [--seed N | --seeds FROM..TO] [--replicas 3|5] [--bug NAME] [--no-faults] [--scenario figure-8|isolated-follower|isolated-leader|transfer|leader-crash] [--membership] [--trace]");
    std::process::exit(2);
}

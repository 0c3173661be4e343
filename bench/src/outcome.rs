//! How a run ended: its exit code and the one plain line that closes its report.
//!
//! Exit codes, most serious first (the first that applies is the run's):
//! - 2 [`EXIT_UNREACHABLE`]: the node was unreachable (nothing listening, or a listener of the
//!   other protocol) or went away during the run;
//! - 3 [`EXIT_DEADLINE`]: the hard deadline (`--deadline-secs`) passed before the run was done;
//! - 1 [`EXIT_FAILED`]: requests failed, or `--verify` found problems;
//! - 4 [`EXIT_SHORT`]: a consume ended with fewer messages than `--messages` asked for, or
//!   the consumers of an e2e run with fewer than its producers got onto the wire;
//! - 0: done.
//!
//! The closing line is `verified N of N messages ...` or `done: ...` for a run that did what
//! it was asked, and `FAILED: ...` with what failed and why otherwise.

use std::sync::atomic::Ordering;

use crate::stats::{Mode, Run};

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;
pub const EXIT_DEADLINE: u8 = 3;
pub const EXIT_SHORT: u8 = 4;

/// The exit code and closing line of a run. `asked` is `--messages` for a produce or a
/// consume, `verify_problems` the verifier's count if `--verify` ran.
pub fn judge(
    mode: Mode,
    run: &Run,
    deadline_passed: bool,
    asked: Option<u64>,
    verify_problems: Option<u64>,
) -> (u8, String) {
    let acked = run.acked.load(Ordering::Relaxed);
    let consumed = run.consumed.load(Ordering::Relaxed);
    let handled = match mode {
        Mode::Produce => format!("{acked} messages acknowledged"),
        Mode::Consume | Mode::EndToEnd | Mode::Fetch => {
            format!("{acked} messages acknowledged, {consumed} consumed")
        }
    };
    if let Some(reason) = run.broker_gone() {
        return (EXIT_UNREACHABLE, format!("FAILED: the node went away ({reason}); {handled}"));
    }
    if deadline_passed {
        let line =
            format!("FAILED: the hard deadline (--deadline-secs) passed before the run was done; {handled}");
        return (EXIT_DEADLINE, line);
    }
    let errors = run.errors.load(Ordering::Relaxed);
    let problems = verify_problems.unwrap_or(0);
    if errors > 0 || problems > 0 {
        let first = run.first_error.lock().expect("no panics under this lock").clone();
        let mut failures = Vec::new();
        if problems > 0 {
            failures.push(format!(
                "verification found {problems} problems in {consumed} messages (the 'verify:' lines on stderr name them)"
            ));
        }
        if errors > 0 {
            failures
                .push(format!("{errors} errors, the first: {}", first.as_deref().unwrap_or("not recorded")));
        }
        return (EXIT_FAILED, format!("FAILED: {}", failures.join("; ")));
    }
    let produced = acked + run.unacknowledged.load(Ordering::Relaxed);
    let expected = match mode {
        Mode::Consume => asked.map(|asked| (asked, "asked for (--messages)")),
        Mode::EndToEnd => Some((produced, "produced")),
        Mode::Produce | Mode::Fetch => None,
    };
    if let Some((expected, what)) = expected.filter(|(expected, _)| consumed < *expected) {
        let line = format!(
            "FAILED: consumed {consumed} of the {expected} messages {what}; the consumers stopped because {}",
            run.consume_stopped()
        );
        return (EXIT_SHORT, line);
    }
    (0, success(mode, run, asked, verify_problems.is_some()))
}

fn success(mode: Mode, run: &Run, asked: Option<u64>, verified: bool) -> String {
    let acked = run.acked.load(Ordering::Relaxed);
    let unacknowledged = run.unacknowledged.load(Ordering::Relaxed);
    let consumed = run.consumed.load(Ordering::Relaxed);
    let gaps = if run.unread.load(Ordering::Relaxed) == 0 { ", none missing" } else { "" };
    if verified {
        return format!(
            "verified {consumed} of {consumed} messages consumed: each once, in order within its partition, payload intact{gaps}"
        );
    }
    match mode {
        Mode::Produce if unacknowledged > 0 => {
            format!("done: {unacknowledged} messages sent without acknowledgement (--acks none)")
        }
        Mode::Produce => match asked {
            Some(asked) => format!("done: {acked} of {asked} messages acknowledged"),
            None => format!("done: {acked} messages acknowledged"),
        },
        Mode::Consume => match asked {
            Some(asked) => format!("done: consumed {consumed} of {asked} messages asked for"),
            None => format!("done: consumed {consumed} messages"),
        },
        Mode::EndToEnd => {
            format!("done: consumed {consumed} of {} messages produced", acked + unacknowledged)
        }
        Mode::Fetch => format!("done: {consumed} records fetched"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_that_get_fewer_than_asked_or_produced_fail_with_the_reason() {
        let run = Run::new();
        run.acked.store(10, Ordering::Relaxed);
        run.consumed.store(7, Ordering::Relaxed);
        run.consumer_stopped("no record arrived for 2 s (--idle-secs)".to_owned());
        let (code, line) = judge(Mode::EndToEnd, &run, false, None, None);
        assert_eq!(code, EXIT_SHORT, "{line}");
        assert_eq!(
            line,
            "FAILED: consumed 7 of the 10 messages produced; the consumers stopped because no record arrived for 2 s (--idle-secs)"
        );
        let (code, line) = judge(Mode::Consume, &run, false, Some(8), None);
        assert_eq!(code, EXIT_SHORT, "{line}");
        assert!(line.starts_with("FAILED: consumed 7 of the 8 messages asked for (--messages)"), "{line}");
        assert_eq!(judge(Mode::Consume, &run, false, Some(7), None).0, 0);
        run.consumed.store(10, Ordering::Relaxed);
        let (code, line) = judge(Mode::EndToEnd, &run, false, None, Some(0));
        assert_eq!(code, 0, "{line}");
        assert!(line.starts_with("verified 10 of 10 messages consumed"), "{line}");
        let (code, line) = judge(Mode::EndToEnd, &run, false, None, Some(2));
        assert_eq!(code, EXIT_FAILED, "{line}");
        assert!(line.starts_with("FAILED: verification found 2 problems in 10 messages"), "{line}");
    }

    #[test]
    fn a_run_stopped_by_the_hard_deadline_exits_3_whatever_its_workers_did() {
        let run = Run::new();
        run.acked.store(214_082, Ordering::Relaxed);
        let (code, line) = judge(Mode::Produce, &run, true, Some(100_000_000), None);
        assert_eq!(code, EXIT_DEADLINE, "{line}");
        assert!(line.starts_with("FAILED: the hard deadline (--deadline-secs) passed"), "{line}");
        assert!(line.ends_with("214082 messages acknowledged"), "{line}");
    }
}

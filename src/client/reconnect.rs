//! Finding a server again after the client's own died: how long to wait
//! between rounds of attempts ([`Backoff`]), and what each server answered
//! ([`Answer`]), in words a person reads in one line per round.

use std::fmt;
use std::io::ErrorKind;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::visible;

/// The wait before the second round of attempts; it doubles each round.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between two rounds, so a server that comes back is
/// found within a few seconds.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// Waits between rounds of reconnection attempts: the first round at once,
/// then 100 ms doubling to a cap of 5 s, each wait drawn at random in the
/// upper half of its step ("equal jitter"), so clients that lost the same
/// server do not all come back in the same millisecond.
pub struct Backoff {
    round: u32,
    rng: StdRng,
}

impl Backoff {
    /// A schedule with jitter from the operating system's randomness.
    pub fn new() -> Backoff {
        Backoff::seeded(rand::random())
    }

    /// A schedule with reproducible jitter (tests).
    pub fn seeded(seed: u64) -> Backoff {
        Backoff {
            round: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The upper bound of the wait before round `round` (0-based): zero
    /// before the first, then 100 ms, 200 ms, 400 ms ... capped at 5 s.
    pub fn step(round: u32) -> Duration {
        if round == 0 {
            return Duration::ZERO;
        }
        // 2^(round-1) overflows nothing: the shift is capped long before.
        let factor = 1u32 << (round - 1).min(16);
        FIRST_DELAY.saturating_mul(factor).min(MAX_DELAY)
    }

    /// The wait before the next round; zero before the first.
    pub fn next_delay(&mut self) -> Duration {
        let step = Backoff::step(self.round);
        self.round = self.round.saturating_add(1);
        if step.is_zero() {
            return step;
        }
        let low = step / 2;
        low + self.rng.random_range(Duration::ZERO..=step - low)
    }

    /// How many rounds have been scheduled so far.
    pub fn rounds(&self) -> u32 {
        self.round
    }
}

/// What one server answered to one attempt to claim the identity there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Nothing listens on the port (the server is down, the machine is up).
    ConnectionRefused,
    /// No route to the host or network.
    Unreachable,
    /// Nothing came back in time (a QUIC server that is down looks like this:
    /// UDP has no "refused").
    TimedOut,
    /// The TLS handshake failed (for instance a certificate of another CA).
    Tls(String),
    /// The server closed the connection before answering.
    Closed,
    /// The server took the connection but refused the identity: it is still
    /// held in the cluster (the dead server's hold is not yet released).
    IdentityRefused,
    /// The server answered with an error line or closed with a reason
    /// (for instance "server full").
    Said(String),
    /// Anything else, as the error reads.
    Other(String),
}

impl Answer {
    /// Classifies a failed attempt from its error chain.
    pub fn of_error(error: &anyhow::Error) -> Answer {
        for cause in error.chain() {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    ErrorKind::ConnectionRefused => return Answer::ConnectionRefused,
                    ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::NetworkDown => return Answer::Unreachable,
                    ErrorKind::TimedOut => return Answer::TimedOut,
                    ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::BrokenPipe => return Answer::Closed,
                    _ => {}
                }
            }
            if let Some(quic) = cause.downcast_ref::<quinn::ConnectionError>() {
                return Answer::of_quic(quic);
            }
            if cause.is::<tokio::time::error::Elapsed>() {
                return Answer::TimedOut;
            }
        }
        Answer::Other(error.to_string())
    }

    fn of_quic(error: &quinn::ConnectionError) -> Answer {
        use quinn::ConnectionError as E;
        // Transport error codes 0x100-0x1ff are TLS alerts (RFC 9001 4.8).
        let tls = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
        match error {
            E::TimedOut => Answer::TimedOut,
            E::TransportError(e) if tls(e.code) => Answer::Tls(if e.reason.is_empty() {
                e.code.to_string()
            } else {
                e.reason.clone()
            }),
            E::ConnectionClosed(close) if tls(close.error_code) => {
                Answer::Tls(format!("the server sent {}", close.error_code))
            }
            E::ApplicationClosed(close) if !close.reason.is_empty() => {
                Answer::Said(String::from_utf8_lossy(&close.reason).into_owned())
            }
            E::ApplicationClosed(_) | E::ConnectionClosed(_) | E::Reset | E::LocallyClosed => {
                Answer::Closed
            }
            other => Answer::Other(other.to_string()),
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::ConnectionRefused => f.write_str("connection refused"),
            Answer::Unreachable => f.write_str("unreachable"),
            Answer::TimedOut => f.write_str("no answer (down or unreachable)"),
            // Error texts may quote what a server sent: made visible.
            Answer::Tls(why) => write!(f, "TLS error: {}", visible(why)),
            Answer::Closed => f.write_str("closed the connection"),
            Answer::IdentityRefused => f.write_str("refused the identity (still held)"),
            Answer::Said(what) => write!(f, "said {:?}", visible(what)),
            Answer::Other(what) => f.write_str(&visible(what)),
        }
    }
}

/// One line for a round of attempts that found no server: what each server
/// answered (servers that answered alike together, in the order tried), and
/// when the next round is.
pub fn round_line(round: u32, answers: &[(String, Answer)], next: Option<Duration>) -> String {
    let mut groups: Vec<(&Answer, Vec<String>)> = Vec::new();
    for (server, answer) in answers {
        let server = visible(server).into_owned();
        match groups.iter_mut().find(|(a, _)| *a == answer) {
            Some((_, servers)) => servers.push(server),
            None => groups.push((answer, vec![server])),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(answer, servers)| format!("{} {answer}", servers.join(", ")))
        .collect();
    let mut line = format!("reconnect attempt {round}: {}", parts.join("; "));
    if let Some(next) = next {
        line += &format!("; next try in {}", seconds(next));
    }
    line
}

/// A duration as a person reads it: "0.1 s", "4.2 s".
pub fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_starts_at_once_then_doubles_from_100_ms_to_a_5_s_cap() {
        let steps: Vec<u128> = (0..10).map(|r| Backoff::step(r).as_millis()).collect();
        assert_eq!(steps, [0, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        // No overflow however long it goes on.
        assert_eq!(Backoff::step(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn each_wait_is_in_the_upper_half_of_its_step_and_jittered() {
        let seed = 13;
        println!("seed {seed}");
        let mut backoff = Backoff::seeded(seed);
        let delays: Vec<Duration> = (0..40).map(|_| backoff.next_delay()).collect();
        assert_eq!(backoff.rounds(), 40);
        assert_eq!(delays[0], Duration::ZERO, "the first round is at once");
        for (round, delay) in delays.iter().enumerate() {
            let step = Backoff::step(round as u32);
            assert!(
                *delay >= step / 2 && *delay <= step,
                "round {round}: {delay:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
        // Jitter: the capped waits are not all the same.
        let capped = &delays[8..];
        assert!(capped.iter().any(|d| *d != capped[0]), "{capped:?}");
        // Two clients with different seeds do not wait in lockstep.
        let mut other = Backoff::seeded(seed + 1);
        let others: Vec<Duration> = (0..40).map(|_| other.next_delay()).collect();
        assert_ne!(delays, others);
        // Total over the first minute of rounds: never more than ~12 per minute
        // once capped, against 300 for the old fixed 200 ms.
        let mut total = Duration::ZERO;
        let rounds = delays
            .iter()
            .take_while(|d| {
                total += **d;
                total < Duration::from_secs(60)
            })
            .count();
        assert!(rounds < 30, "{rounds} rounds in a minute");
    }

    #[test]
    fn errors_are_told_in_a_few_words() {
        let io = |kind: ErrorKind| {
            anyhow::Error::new(std::io::Error::from(kind)).context("cannot connect over TCP")
        };
        assert_eq!(
            Answer::of_error(&io(ErrorKind::ConnectionRefused)),
            Answer::ConnectionRefused
        );
        assert_eq!(
            Answer::of_error(&io(ErrorKind::HostUnreachable)),
            Answer::Unreachable
        );
        assert_eq!(
            Answer::of_error(&io(ErrorKind::NetworkUnreachable)),
            Answer::Unreachable
        );
        assert_eq!(Answer::of_error(&io(ErrorKind::TimedOut)), Answer::TimedOut);
        assert_eq!(
            Answer::of_error(&io(ErrorKind::ConnectionReset)),
            Answer::Closed
        );
        let quic = |e: quinn::ConnectionError| anyhow::Error::new(e).context("over QUIC");
        assert_eq!(
            Answer::of_error(&quic(quinn::ConnectionError::TimedOut)),
            Answer::TimedOut
        );
        // A certificate from another CA: rustls's alert, code 0x100 + 48.
        let mut bad_cert = quinn_proto::TransportError::from(quinn::TransportErrorCode::crypto(48));
        bad_cert.reason = "invalid peer certificate: UnknownIssuer".into();
        let answer = Answer::of_error(&quic(quinn::ConnectionError::TransportError(bad_cert)));
        assert_eq!(
            answer.to_string(),
            "TLS error: invalid peer certificate: UnknownIssuer"
        );
        let elapsed = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::ZERO, std::future::pending::<()>()).await
            })
            .unwrap_err();
        assert_eq!(
            Answer::of_error(&anyhow::Error::new(elapsed)),
            Answer::TimedOut
        );
        assert_eq!(
            Answer::of_error(&anyhow::anyhow!("cannot resolve nowhere:1")).to_string(),
            "cannot resolve nowhere:1"
        );
    }

    #[test]
    fn a_round_is_one_line_naming_each_server_and_the_next_try() {
        let line = round_line(
            3,
            &[
                ("127.0.0.1:4445".into(), Answer::IdentityRefused),
                ("127.0.0.1:4446".into(), Answer::ConnectionRefused),
                ("10.9.9.9:4444".into(), Answer::TimedOut),
                ("127.0.0.1:4448".into(), Answer::ConnectionRefused),
                (
                    "127.0.0.1:4447".into(),
                    Answer::Said("server full\u{1b}[2J".into()),
                ),
            ],
            Some(Duration::from_millis(380)),
        );
        assert_eq!(
            line,
            "reconnect attempt 3: 127.0.0.1:4445 refused the identity (still held); \
             127.0.0.1:4446, 127.0.0.1:4448 connection refused; 10.9.9.9:4444 no answer (down or unreachable); \
             127.0.0.1:4447 said \"server full^[[2J\"; next try in 0.4 s"
        );
        assert!(!line.contains('\n'));
        assert_eq!(
            round_line(1, &[("a:1".into(), Answer::Unreachable)], None),
            "reconnect attempt 1: a:1 unreachable"
        );
    }
}

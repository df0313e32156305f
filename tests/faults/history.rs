//! What happened in a run, and the checks over it: the clients' sessions
//! (every line sent and received, with its time), the network's states as the
//! schedule made them, and three rules.
//!
//! Times are seconds since the lab's start. A client's hold of a name is
//! taken from what the client saw, which is always inside what the servers
//! did: it starts when the approval arrives (the grant was earlier) and ends
//! when the client sends `quit` or drops the connection (the release is
//! later), or when it sees its server close the connection or evict it. Two
//! such holds overlapping is therefore a real double grant, never an artefact
//! of the clocks.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Seconds since the lab's start.
pub type Secs = f64;

/// Identity or room id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Identity,
    Room,
}

/// A client's hold of a name.
#[derive(Clone, Debug)]
pub struct Hold {
    pub kind: Kind,
    pub name: String,
    pub start: Secs,
    /// None while open; every hold is closed by the end of its session.
    pub end: Option<Secs>,
    pub why_end: &'static str,
}

/// A request and its answer.
#[derive(Clone, Debug)]
pub struct Request {
    /// `connect`, `newidentity`, `createroom` or `quit`.
    pub what: &'static str,
    pub name: String,
    pub sent: Secs,
    /// When the answer (or the connection's close) came; None if it never did.
    pub answered: Option<Secs>,
    /// A name granted by this answer.
    pub granted: bool,
}

/// One connection of one client.
#[derive(Clone, Debug)]
pub struct Session {
    pub client: usize,
    pub seq: u32,
    /// 0-based node index.
    pub server: usize,
    /// Everything sent (`->`) and received (`<-`), and what happened.
    pub lines: Vec<(Secs, String)>,
    pub requests: Vec<Request>,
    pub holds: Vec<Hold>,
}

impl Session {
    pub fn label(&self) -> String {
        format!("c{:02}#{} on s{}", self.client, self.seq, self.server + 1)
    }
}

/// The network as the schedule left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    pub running: Vec<bool>,
    /// Stopped with SIGSTOP: the process exists (its sockets stay open, its
    /// clients keep their connections) but does nothing until SIGCONT.
    pub paused: Vec<bool>,
    /// `deaf[a][b]`: a's kernel drops mesh datagrams from b.
    pub deaf: Vec<Vec<bool>>,
    /// Random loss of arriving mesh datagrams, per node, in percent.
    pub loss: Vec<u8>,
}

impl NetState {
    /// Every node running, every link whole.
    pub fn whole(n: usize) -> NetState {
        NetState {
            running: vec![true; n],
            paused: vec![false; n],
            deaf: vec![vec![false; n]; n],
            loss: vec![0; n],
        }
    }

    /// Both running, and neither drops the other's datagrams (loss is not a
    /// cut: the system is built to ride it out).
    pub fn talk(&self, a: usize, b: usize) -> bool {
        self.up(a) && self.up(b) && !self.deaf[a][b] && !self.deaf[b][a]
    }

    /// Running and not paused.
    pub fn up(&self, a: usize) -> bool {
        self.running[a] && !self.paused[a]
    }

    /// How many servers a's side has (a included): the servers reachable
    /// from a over links that work both ways. 0 if a is not running or paused.
    pub fn side(&self, a: usize) -> usize {
        if !self.up(a) {
            return 0;
        }
        let n = self.running.len();
        let mut seen = vec![false; n];
        let mut stack = vec![a];
        seen[a] = true;
        while let Some(x) = stack.pop() {
            for (y, seen) in seen.iter_mut().enumerate() {
                if !*seen && self.talk(x, y) {
                    *seen = true;
                    stack.push(y);
                }
            }
        }
        seen.iter().filter(|&&s| s).count()
    }

    /// The state with every link whole (who runs, and who is paused, unchanged).
    pub fn healed(&self) -> NetState {
        NetState {
            running: self.running.clone(),
            paused: self.paused.clone(),
            ..NetState::whole(self.running.len())
        }
    }
}

/// One change of the network, applied between `start` and `end`.
#[derive(Clone, Debug)]
pub struct Change {
    pub start: Secs,
    pub end: Secs,
    pub state: NetState,
    pub what: String,
}

/// A silence a node logged: `observer` heard nothing from `peer` from
/// `from` (its `peer_down` time less the silence it reported) to `to` (its
/// `peer_up`).
#[derive(Clone, Debug)]
pub struct Down {
    pub observer: usize,
    pub peer: usize,
    pub from: Secs,
    pub to: Secs,
    /// The silence the detector reported, 0 for a closed connection.
    pub silent: Secs,
}

/// `intervals` less every `[from, to)` of `cuts`: a piece after a cut starts
/// at the cut's end, so allowances count from there.
fn without(intervals: &[(Secs, Secs)], cuts: &[(Secs, Secs)]) -> Vec<(Secs, Secs)> {
    let mut out = Vec::new();
    for &(from, to) in intervals {
        let mut at = from;
        for &(cut_from, cut_to) in cuts {
            if cut_to <= at || cut_from >= to {
                continue;
            }
            if cut_from > at {
                out.push((at, cut_from));
            }
            at = at.max(cut_to);
        }
        if at < to {
            out.push((at, to));
        }
    }
    out
}

/// The intervals `[from, to)` in which `holds` surely held: from the end of
/// the change that made it true to the start of the change that made it
/// false (a change takes a while to apply; either state may hold meanwhile).
fn intervals(changes: &[Change], holds: impl Fn(&NetState) -> bool) -> Vec<(Secs, Secs)> {
    let mut out = Vec::new();
    let mut since: Option<Secs> = None;
    for change in changes {
        let now = holds(&change.state);
        match (since, now) {
            (None, true) => since = Some(change.end),
            (Some(from), false) => {
                out.push((from, change.start));
                since = None;
            }
            _ => {}
        }
    }
    if let Some(from) = since {
        out.push((from, f64::INFINITY));
    }
    out
}

/// What the checks allow.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long after two servers can talk again a name may still be held on
    /// both (granted on each side of a partition; the heal evicts one holder).
    pub heal_allowance: Secs,
    /// How long after a server is cut off from a majority it may still grant.
    pub minority_grace: Secs,
    /// Longest a request may wait for its answer.
    pub answer_limit: Secs,
}

/// The outcome of the checks.
#[derive(Debug, Default)]
pub struct Findings {
    /// Broken rules, each with the history that shows it.
    pub violations: Vec<String>,
    /// Names held twice at once in a way the rules allow (across servers
    /// that could not talk, or within the heal allowance), and the longest.
    pub tolerated_doubles: usize,
    pub longest_tolerated: Secs,
    /// Grants by a minority side within its grace.
    pub minority_grants_in_grace: usize,
    /// Names held twice at once on servers the schedule left connected, but
    /// across a silence the servers themselves logged (a starved process,
    /// say): reported, not counted as violations.
    pub explained: Vec<String>,
    /// Silences (`peer_down` on a timeout) between servers the schedule left
    /// connected, and the longest.
    pub unscheduled_silences: usize,
    pub longest_unscheduled_silence: Secs,
    /// Figures of the workload.
    pub sessions: usize,
    pub identity_grants: usize,
    pub room_grants: usize,
    pub refusals: usize,
    pub evictions: usize,
    pub slowest_answer: Secs,
}

/// Checks the history against the network's timeline (`changes`, the first
/// being the state when the clients started).
pub fn check(
    sessions: &[Session],
    changes: &[Change],
    downs: &[Down],
    n: usize,
    limits: Limits,
) -> Findings {
    check_with(sessions, changes, downs, &[], n, limits)
}

/// A grant as the deciding leader logged it (`claim_granted`): when, to
/// which server's client (0-based), and the name.
#[derive(Clone, Debug)]
pub struct Decision {
    pub at: Secs,
    pub asker: usize,
    pub kind: Kind,
    pub name: String,
}

/// [`check`], with the leaders' logged decisions: rule 5 then judges a grant
/// at the moment it was decided rather than when its client heard of it (an
/// answer decided before a cut and delivered after it is not a zombie's).
pub fn check_with(
    sessions: &[Session],
    changes: &[Change],
    downs: &[Down],
    decisions: &[Decision],
    n: usize,
    limits: Limits,
) -> Findings {
    let mut f = Findings {
        sessions: sessions.len(),
        ..Findings::default()
    };
    for s in sessions {
        for r in &s.requests {
            if r.granted {
                match r.what {
                    "newidentity" => f.identity_grants += 1,
                    _ => f.room_grants += 1,
                }
            } else if r.what != "connect" && r.what != "quit" && r.answered.is_some() {
                f.refusals += 1;
            }
        }
        f.evictions += s.holds.iter().filter(|h| h.why_end == "evicted").count();
    }
    no_name_twice(sessions, changes, downs, n, limits, &mut f);
    minority_grants_nothing(sessions, changes, n, limits, &mut f);
    every_request_answered(sessions, changes, n, limits, &mut f);
    no_grant_over_a_live_holder(sessions, changes, downs, decisions, n, &mut f);
    f
}

/// The states in force at some moment of `[from, to]` (a change counts from
/// its start: while it is applied, either state may hold).
fn states_during(changes: &[Change], from: Secs, to: Secs) -> impl Iterator<Item = &NetState> {
    let first = changes.iter().rposition(|c| c.start <= from).unwrap_or(0);
    changes[first..]
        .iter()
        .take_while(move |c| c.start <= to)
        .map(|c| &c.state)
}

/// When server `a` may have been paused: from the start of the change that
/// paused it to the end of the one that resumed it.
fn paused_spans(changes: &[Change], a: usize) -> Vec<(Secs, Secs)> {
    let mut out = Vec::new();
    let mut since = None;
    for c in changes {
        match (since, c.state.paused[a]) {
            (None, true) => since = Some(c.start),
            (Some(from), false) => {
                out.push((from, c.end));
                since = None;
            }
            _ => {}
        }
    }
    if let Some(from) = since {
        out.push((from, f64::INFINITY));
    }
    out
}

/// Rule 5: a name is granted only once its earlier holder's server could
/// have been purged. A grant that arrives while a client of another server
/// `b` holds the name (granted earlier) is a double grant unless `b` was cut
/// off from a majority, stopped or paused at some moment in between, or
/// some server other than the granting one logged `b` down meanwhile (the
/// registry frees a server's names only when a majority, and every live
/// server, sees it down). This
/// is stricter than rule 1 in one way that matters: it does not wait for
/// the two servers to talk. A zombie leader (paused, or cut off) that wakes
/// and grants what the majority's leader granted meanwhile breaks it at the
/// moment of the grant, even if the heal evicts one holder a second later.
fn no_grant_over_a_live_holder(
    sessions: &[Session],
    changes: &[Change],
    downs: &[Down],
    decisions: &[Decision],
    n: usize,
    f: &mut Findings,
) {
    let majority = n / 2 + 1;
    let mut by_name: BTreeMap<(Kind, &str), Vec<(usize, &Hold)>> = BTreeMap::new();
    for (i, s) in sessions.iter().enumerate() {
        for h in &s.holds {
            by_name.entry((h.kind, &h.name)).or_default().push((i, h));
        }
    }
    for ((kind, name), holds) in by_name {
        for &(i, h) in &holds {
            for &(j, g) in &holds {
                let (b, a) = (sessions[i].server, sessions[j].server);
                // h earlier, g granted while h still held, on another server.
                if sessions[i].client == sessions[j].client
                    || a == b
                    || h.start >= g.start
                    || h.end.is_some_and(|end| end <= g.start)
                {
                    continue;
                }
                // When g was decided: the last logged decision of this name
                // for a's clients before its client heard of it (the node
                // logs and the clients share the machine's clock; 50 ms
                // covers the rounding of the two conversions).
                let decided = decisions
                    .iter()
                    .filter(|d| d.asker == a && d.kind == kind && d.name == name)
                    .filter(|d| d.at <= g.start + 0.05)
                    .map(|d| d.at)
                    .fold(None, |last: Option<Secs>, t| {
                        Some(last.map_or(t, |l| l.max(t)))
                    })
                    .unwrap_or(g.start);
                if decided <= h.start {
                    continue; // decided before h was granted: h is the later grant
                }
                let isolated = states_during(changes, h.start, decided)
                    .any(|state| !state.up(b) || state.side(b) < majority);
                let logged_down = downs.iter().any(|d| {
                    d.peer == b && d.observer != a && d.to >= h.start && d.from <= decided
                });
                if isolated || logged_down {
                    continue;
                }
                let mut text = format!(
                    "(5) {kind:?} {name} granted on s{} at t={:.3} (decided at t={decided:.3}) \
                     while a client of s{} held it since t={:.3}, and s{} kept a majority and \
                     no other server logged it down meanwhile (nothing could have freed the \
                     name)\n",
                    a + 1,
                    g.start,
                    b + 1,
                    h.start,
                    b + 1
                );
                history(&mut text, &sessions[i]);
                history(&mut text, &sessions[j]);
                network(&mut text, changes, h.start - 3.0, g.start + 3.0);
                silences(
                    &mut text,
                    downs,
                    (a.min(b), a.max(b)),
                    h.start - 3.0,
                    g.start + 3.0,
                );
                f.violations.push(text);
            }
        }
    }
}

/// Rule 1: no name held by two clients at once on one server, or on two
/// servers that have been able to talk for the heal allowance.
fn no_name_twice(
    sessions: &[Session],
    changes: &[Change],
    downs: &[Down],
    n: usize,
    limits: Limits,
    f: &mut Findings,
) {
    // Per pair: when the schedule let them talk, and when they also heard
    // each other (no silence either logged).
    let mut scheduled = BTreeMap::new();
    let mut heard = BTreeMap::new();
    for a in 0..n {
        for b in a + 1..n {
            let talk = intervals(changes, |s| s.talk(a, b));
            let mut silences: Vec<(Secs, Secs)> = downs
                .iter()
                .filter(|d| (d.observer, d.peer) == (a, b) || (d.observer, d.peer) == (b, a))
                .map(|d| (d.from, d.to))
                .collect();
            silences.sort_by(|x, y| x.0.total_cmp(&y.0));
            for d in downs.iter().filter(|d| {
                d.silent > 0.0 && (d.observer.min(d.peer), d.observer.max(d.peer)) == (a, b)
            }) {
                let detected = d.from + d.silent;
                if talk
                    .iter()
                    .any(|&(from, to)| from <= d.from && detected <= to)
                {
                    f.unscheduled_silences += 1;
                    f.longest_unscheduled_silence = f.longest_unscheduled_silence.max(d.silent);
                }
            }
            heard.insert((a, b), without(&talk, &silences));
            scheduled.insert((a, b), talk);
        }
    }
    // The first moment of `[lo, hi)` past the allowance in one of `spans`.
    let past_allowance = |spans: &[(Secs, Secs)], lo: Secs, hi: Secs| {
        spans.iter().find_map(|&(from, to)| {
            let (l, r) = (lo.max(from + limits.heal_allowance), hi.min(to));
            (l < r).then_some((l, r, from))
        })
    };
    let mut by_name: BTreeMap<(Kind, &str), Vec<(usize, &Hold)>> = BTreeMap::new();
    for (i, s) in sessions.iter().enumerate() {
        for h in &s.holds {
            by_name.entry((h.kind, &h.name)).or_default().push((i, h));
        }
    }
    for ((kind, name), holds) in by_name {
        for (x, &(i, h)) in holds.iter().enumerate() {
            for &(j, g) in &holds[x + 1..] {
                if sessions[i].client == sessions[j].client {
                    continue; // one client's sessions follow one another
                }
                let end = |h: &Hold| h.end.unwrap_or(f64::INFINITY);
                let (lo, hi) = (h.start.max(g.start), end(h).min(end(g)));
                if hi <= lo {
                    continue;
                }
                let (a, b) = (sessions[i].server, sessions[j].server);
                let pair = (a.min(b), a.max(b));
                let (bad, explained) = if a == b {
                    (Some((lo, hi, "the same server".to_owned())), false)
                } else {
                    let since = |(l, r, from)| {
                        (
                            l,
                            r,
                            format!(
                                "servers able to talk and hearing each other since t={from:.3}"
                            ),
                        )
                    };
                    match past_allowance(&heard[&pair], lo, hi) {
                        Some(bad) => (Some(since(bad)), false),
                        None => match past_allowance(&scheduled[&pair], lo, hi) {
                            Some((l, r, from)) => (
                                Some((
                                    l,
                                    r,
                                    format!(
                                        "servers the schedule left connected since t={from:.3}, \
                                     but across a silence they logged"
                                    ),
                                )),
                                true,
                            ),
                            None => (None, false),
                        },
                    }
                };
                match bad {
                    Some((l, r, why)) => {
                        let mut text = format!(
                            "(1) {kind:?} {name} held twice at once on s{} and s{}, t={lo:.3}..{hi:.3}, \
                             {:.3} s of it ({l:.3}..{r:.3}) on {why} (allowance {:.2} s after a heal)\n",
                            a + 1,
                            b + 1,
                            r - l,
                            limits.heal_allowance
                        );
                        history(&mut text, &sessions[i]);
                        history(&mut text, &sessions[j]);
                        let (from, to) = (h.start.min(g.start) - 3.0, hi.min(lo + 30.0));
                        network(&mut text, changes, from, to);
                        silences(&mut text, downs, pair, from, to);
                        if explained {
                            f.explained.push(text);
                        } else {
                            f.violations.push(text);
                        }
                    }
                    None => {
                        f.tolerated_doubles += 1;
                        f.longest_tolerated = f.longest_tolerated.max(hi - lo);
                    }
                }
            }
        }
    }
}

/// Rule 2: a server without a majority on its side grants nothing asked
/// after its grace.
fn minority_grants_nothing(
    sessions: &[Session],
    changes: &[Change],
    n: usize,
    limits: Limits,
    f: &mut Findings,
) {
    let majority = n / 2 + 1;
    let minority: Vec<Vec<(Secs, Secs)>> = (0..n)
        .map(|a| intervals(changes, |s| s.running[a] && s.side(a) < majority))
        .collect();
    for s in sessions {
        for r in s.requests.iter().filter(|r| r.granted) {
            let Some(answered) = r.answered else { continue };
            for &(from, to) in &minority[s.server] {
                if from <= r.sent && answered < to {
                    if r.sent >= from + limits.minority_grace {
                        let mut text = format!(
                            "(2) {} {} granted on s{} in a minority: asked at t={:.3}, granted at t={answered:.3}, \
                             s{} without a majority since t={from:.3} (grace {:.2} s)\n",
                            r.what,
                            r.name,
                            s.server + 1,
                            r.sent,
                            s.server + 1,
                            limits.minority_grace
                        );
                        history(&mut text, s);
                        network(&mut text, changes, from - 3.0, answered + 3.0);
                        f.violations.push(text);
                    } else {
                        f.minority_grants_in_grace += 1;
                    }
                }
            }
        }
    }
}

/// Rule 3: every request is answered (or its connection closed) in time.
fn every_request_answered(
    sessions: &[Session],
    changes: &[Change],
    n: usize,
    limits: Limits,
    f: &mut Findings,
) {
    let paused: Vec<Vec<(Secs, Secs)>> = (0..n).map(|a| paused_spans(changes, a)).collect();
    for s in sessions {
        for r in &s.requests {
            // A paused server answers nothing until it is resumed; its
            // clients wait (and may give up) without it being a fault.
            let latest = r.answered.unwrap_or(f64::INFINITY);
            if paused[s.server]
                .iter()
                .any(|&(from, to)| from <= latest && r.sent <= to)
            {
                continue;
            }
            let waited = r.answered.map(|a| a - r.sent);
            if let Some(w) = waited {
                f.slowest_answer = f.slowest_answer.max(w);
            }
            if waited.is_none_or(|w| w > limits.answer_limit) {
                let mut text = format!(
                    "(3) {} {} on s{} sent at t={:.3}: {} (limit {:.1} s)\n",
                    r.what,
                    r.name,
                    s.server + 1,
                    r.sent,
                    match waited {
                        Some(w) => format!("answered after {w:.3} s"),
                        None => "never answered".to_owned(),
                    },
                    limits.answer_limit
                );
                history(&mut text, s);
                network(&mut text, changes, r.sent - 3.0, r.sent + 10.0);
                f.violations.push(text);
            }
        }
    }
}

/// The silences between `pair` logged in `[from, to]`.
fn silences(out: &mut String, downs: &[Down], pair: (usize, usize), from: Secs, to: Secs) {
    let mut header = false;
    for d in downs {
        let this = (d.observer.min(d.peer), d.observer.max(d.peer));
        if this == pair && d.to >= from && d.from <= to {
            if !header {
                let _ = writeln!(out, "  silences the servers logged:");
                header = true;
            }
            let _ = writeln!(
                out,
                "    t={:8.3}..{:.3}  s{} heard nothing from s{} (peer_down after {:.0} ms)",
                d.from,
                d.to,
                d.observer + 1,
                d.peer + 1,
                d.silent * 1e3
            );
        }
    }
}

fn history(out: &mut String, s: &Session) {
    let _ = writeln!(out, "  client {}:", s.label());
    for (t, line) in &s.lines {
        let _ = writeln!(out, "    t={t:8.3}  {line}");
    }
}

/// The changes that overlap `[from, to]`, and the one in force at `from`.
fn network(out: &mut String, changes: &[Change], from: Secs, to: Secs) {
    let _ = writeln!(out, "  network:");
    let first = changes.iter().rposition(|c| c.start <= from).unwrap_or(0);
    for c in changes[first..].iter().take_while(|c| c.start <= to) {
        let _ = writeln!(out, "    t={:8.3}..{:.3}  {}", c.start, c.end, c.what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(at: Secs, state: NetState) -> Change {
        Change {
            start: at,
            end: at + 0.1,
            state,
            what: String::new(),
        }
    }

    fn session(client: usize, server: usize, kind: Kind, start: Secs, end: Secs) -> Session {
        Session {
            client,
            seq: 0,
            server,
            lines: Vec::new(),
            requests: vec![Request {
                what: "newidentity",
                name: "user01".into(),
                sent: start - 0.01,
                answered: Some(start),
                granted: true,
            }],
            holds: vec![Hold {
                kind,
                name: "user01".into(),
                start,
                end: Some(end),
                why_end: "quit",
            }],
        }
    }

    /// The violations of one rule, `"(1)"` say.
    fn of_rule(f: &Findings, rule: &str) -> usize {
        f.violations.iter().filter(|v| v.starts_with(rule)).count()
    }

    const LIMITS: Limits = Limits {
        heal_allowance: 2.35,
        minority_grace: 1.35,
        answer_limit: 5.0,
    };

    /// s1,s2 | s3,s4,s5 from t=10 to t=20.
    fn split_timeline() -> Vec<Change> {
        let mut split = NetState::whole(5);
        for a in 0..2 {
            for b in 2..5 {
                split.deaf[a][b] = true;
                split.deaf[b][a] = true;
            }
        }
        vec![
            change(0.0, NetState::whole(5)),
            change(10.0, split),
            change(20.0, NetState::whole(5)),
        ]
    }

    #[test]
    fn a_name_held_twice_across_a_partition_is_allowed_until_the_heal_settles() {
        let changes = split_timeline();
        // Granted on s1 before, on s3 during the split; s1's holder evicted
        // 1 s after the heal: allowed.
        let sessions = [
            session(1, 0, Kind::Identity, 5.0, 21.0),
            session(2, 2, Kind::Identity, 12.0, 30.0),
        ];
        let f = check(&sessions, &changes, &[], 5, LIMITS);
        assert!(f.violations.is_empty(), "{:?}", f.violations);
        assert_eq!(f.tolerated_doubles, 1);
        // Still held on both 3 s after the heal: a violation.
        let sessions = [
            session(1, 0, Kind::Identity, 5.0, 23.5),
            session(2, 2, Kind::Identity, 12.0, 30.0),
        ];
        let f = check(&sessions, &changes, &[], 5, LIMITS);
        assert_eq!(f.violations.len(), 1, "{:?}", f.violations);
        // Held twice while connected: a violation (of rule 5 too: s1 never
        // lost its majority).
        let sessions = [
            session(1, 0, Kind::Room, 2.0, 6.0),
            session(2, 4, Kind::Room, 5.0, 8.0),
        ];
        let f = check(&sessions, &changes, &[], 5, LIMITS);
        assert_eq!(of_rule(&f, "(1)"), 1, "{:?}", f.violations);
        assert_eq!(of_rule(&f, "(5)"), 1, "{:?}", f.violations);
        // One after the other: fine.
        let sessions = [
            session(1, 0, Kind::Room, 2.0, 6.0),
            session(2, 4, Kind::Room, 6.0, 8.0),
        ];
        assert!(
            check(&sessions, &changes, &[], 5, LIMITS)
                .violations
                .is_empty()
        );
    }

    #[test]
    fn a_name_held_twice_across_a_silence_the_servers_logged_is_reported_apart() {
        let changes = split_timeline();
        let sessions = [
            session(1, 0, Kind::Identity, 2.0, 6.0),
            session(2, 4, Kind::Identity, 5.0, 8.0),
        ];
        // s5 heard nothing from s1 from t=4.5 to t=5.5: the double hold from
        // t=5 ends within the allowance after that.
        let downs = [Down {
            observer: 4,
            peer: 0,
            from: 4.5,
            to: 5.5,
            silent: 0.4,
        }];
        let f = check(&sessions, &changes, &downs, 5, LIMITS);
        assert_eq!(of_rule(&f, "(1)"), 0, "{:?}", f.violations);
        assert_eq!(f.explained.len(), 1);
        assert_eq!(f.unscheduled_silences, 1);
        // Rule 5 is not excused by the granting server's own silence (only
        // a majority seeing s1 down frees its names), but by another's.
        assert_eq!(of_rule(&f, "(5)"), 1, "{:?}", f.violations);
        let seen_by_s3 = [
            downs[0].clone(),
            Down {
                observer: 2,
                ..downs[0].clone()
            },
        ];
        let f = check(&sessions, &changes, &seen_by_s3, 5, LIMITS);
        assert!(f.violations.is_empty(), "{:?}", f.violations);
        // A silence of another pair explains nothing.
        let downs = [Down {
            observer: 3,
            peer: 0,
            ..downs[0].clone()
        }];
        let f = check(&sessions, &changes, &downs, 5, LIMITS);
        assert_eq!(of_rule(&f, "(1)"), 1, "{:?}", f.violations);
        assert!(f.explained.is_empty());
    }

    #[test]
    fn a_minority_grant_after_the_grace_is_a_violation() {
        let changes = split_timeline();
        let early = [session(1, 0, Kind::Identity, 10.5, 11.0)];
        let f = check(&early, &changes, &[], 5, LIMITS);
        assert!(f.violations.is_empty());
        assert_eq!(f.minority_grants_in_grace, 1);
        let late = [session(1, 1, Kind::Identity, 13.0, 14.0)];
        assert_eq!(check(&late, &changes, &[], 5, LIMITS).violations.len(), 1);
        let majority = [session(1, 3, Kind::Identity, 13.0, 14.0)];
        assert!(
            check(&majority, &changes, &[], 5, LIMITS)
                .violations
                .is_empty()
        );
    }

    #[test]
    fn a_late_or_missing_answer_is_a_violation() {
        let changes = split_timeline();
        let mut s = session(1, 0, Kind::Identity, 3.0, 4.0);
        s.requests[0].answered = None;
        assert_eq!(
            check(&[s.clone()], &changes, &[], 5, LIMITS)
                .violations
                .len(),
            1
        );
        s.requests[0].answered = Some(s.requests[0].sent + 6.0);
        assert_eq!(check(&[s], &changes, &[], 5, LIMITS).violations.len(), 1);
    }

    /// s1 paused from t=10 to t=20.
    fn pause_timeline() -> Vec<Change> {
        let mut paused = NetState::whole(5);
        paused.paused[0] = true;
        vec![
            change(0.0, NetState::whole(5)),
            change(10.0, paused),
            change(20.0, NetState::whole(5)),
        ]
    }

    #[test]
    fn a_zombie_grant_over_the_majoritys_holder_is_a_violation_at_once() {
        let changes = pause_timeline();
        // s1's holder from before the pause, s3's granted during it, s1's
        // holder gone 1 s after the resume: allowed.
        let sessions = [
            session(1, 0, Kind::Identity, 5.0, 21.0),
            session(2, 2, Kind::Identity, 12.0, 30.0),
        ];
        let f = check(&sessions, &changes, &[], 5, LIMITS);
        assert!(f.violations.is_empty(), "{:?}", f.violations);
        // s1 wakes and grants the name s3's client has held since t=12,
        // even if only for a moment: rule 1 allows it, rule 5 does not.
        let sessions = [
            session(1, 0, Kind::Identity, 20.2, 20.5),
            session(2, 2, Kind::Identity, 12.0, 30.0),
        ];
        let f = check(&sessions, &changes, &[], 5, LIMITS);
        assert_eq!(of_rule(&f, "(1)"), 0, "{:?}", f.violations);
        assert_eq!(of_rule(&f, "(5)"), 1, "{:?}", f.violations);
    }

    #[test]
    fn a_grant_decided_before_the_other_holder_was_granted_is_not_rule_5s() {
        // Decided on s1's behalf at t=11 (before s3's client got the name at
        // t=12), heard by s1's client only after its pause: the later grant
        // is s3's, and s1 was paused then.
        let changes = pause_timeline();
        let sessions = [
            session(1, 0, Kind::Identity, 20.2, 20.5),
            session(2, 2, Kind::Identity, 12.0, 30.0),
        ];
        let decided = |at| Decision {
            at,
            asker: 0,
            kind: Kind::Identity,
            name: "user01".into(),
        };
        let f = check_with(&sessions, &changes, &[], &[decided(11.0)], 5, LIMITS);
        assert_eq!(of_rule(&f, "(5)"), 0, "{:?}", f.violations);
        // Decided after the wake: the zombie's.
        let f = check_with(&sessions, &changes, &[], &[decided(20.15)], 5, LIMITS);
        assert_eq!(of_rule(&f, "(5)"), 1, "{:?}", f.violations);
    }

    #[test]
    fn a_request_to_a_paused_server_may_wait_until_it_resumes() {
        let changes = pause_timeline();
        let mut s = session(1, 0, Kind::Identity, 12.0, 22.0);
        s.requests[0].answered = Some(20.5);
        assert!(
            check(&[s.clone()], &changes, &[], 5, LIMITS)
                .violations
                .is_empty()
        );
        s.requests[0].answered = None;
        assert!(
            check(&[s.clone()], &changes, &[], 5, LIMITS)
                .violations
                .is_empty()
        );
        // Sent after the resume: the usual limit.
        s.requests[0].sent = 21.0;
        assert_eq!(of_rule(&check(&[s], &changes, &[], 5, LIMITS), "(3)"), 1);
    }

    #[test]
    fn sides_follow_two_way_links() {
        let mut s = NetState::whole(5);
        s.deaf[0][4] = true; // one way: s1 and s5 cannot talk, but both reach the rest
        assert_eq!(s.side(0), 5);
        s.running[1] = false;
        s.deaf[0][2] = true;
        s.deaf[0][3] = true;
        assert_eq!(s.side(0), 1);
        assert_eq!(s.side(1), 0);
        assert_eq!(s.side(2), 3);
    }
}

//! The safety rules one by one, each with a test that fails if its rule is
//! taken out: grants wait for a majority's acknowledgement, a fenced server
//! never acknowledges an older leader, a new leader's base holds what an
//! earlier one committed, names are freed only when a majority sees their
//! server down, and the smaller guards (stale reports, stale timers, stale
//! evictions, lost frames).

use super::*;

fn ids(n: usize) -> Vec<ServerId> {
    (0..n).map(sid).collect()
}

fn ack(from: &str, term: u64, seq: u64) -> Input {
    msg(from, RegistryMessage::Ack { term, seq })
}

fn announced_seq(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::Broadcast {
            msg: RegistryMessage::Announce { seq, .. },
        } => Some(*seq),
        _ => None,
    })
}

fn sent<'a>(actions: &'a [Action], to: &str) -> Vec<&'a RegistryMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to: t, msg } if t == to => Some(msg),
            _ => None,
        })
        .collect()
}

fn entry(identity: &str, server: &str, stamp: (u64, u64, &str)) -> IdentityEntry {
    IdentityEntry {
        identity: identity.into(),
        server: server.into(),
        moving_to: None,
        move_proof: None,
        stamp: Stamp {
            term: stamp.0,
            seq: stamp.1,
            leader: stamp.2.into(),
        },
    }
}

/// `op` from `from` (ticket `id`) decided by the leader `reg` at `at`, every
/// announcement acknowledged: the answers.
fn decide(
    reg: &mut Registry,
    at: Instant,
    from: &str,
    id: u64,
    op: Op,
) -> Vec<(ServerId, u64, Verdict)> {
    let mut out = reg.handle(at, msg(from, request(1, 1, id, id, op)));
    out.extend(ack_all(reg, at));
    answers(&out)
}

fn registered(reg: &Registry, identity: &str) -> Option<IdentityEntry> {
    let lead = reg.leading.as_ref().expect("leads");
    lead.registry.identities.get(identity).cloned()
}

#[test]
fn a_grant_waits_for_a_majority_of_acknowledgements_even_at_four_servers() {
    // Four servers: a majority is three, the leader and two followers.
    let (mut reg, now) = hand_leader(4, true);
    let out = reg.handle(
        now,
        msg("s1", request(1, 1, 1, 1, Op::Claim(ident("Adel")))),
    );
    let seq = announced_seq(&out).expect("announced");
    assert!(answers(&out).is_empty(), "not before anyone acknowledged");
    let out = reg.handle(now, ack("s1", 1, seq));
    assert!(answers(&out).is_empty(), "two of four is no majority");
    let waited = now + leader::SPREAD_WAIT;
    let out = reg.handle(waited, Input::Timer(Timer::HeldAnswers));
    assert!(answers(&out).is_empty(), "nor once the spread wait is over");
    // An acknowledgement of another term counts for nothing.
    let out = reg.handle(waited, ack("s2", 0, seq));
    assert!(answers(&out).is_empty());
    // Three of four: committed, and s3 is waited for no longer.
    let out = reg.handle(waited, ack("s2", 1, seq));
    assert!(matches!(
        answers(&out).as_slice(),
        [(to, 1, Verdict::Granted { .. })] if to == "s1"
    ));
}

#[test]
fn refusals_go_at_once_and_grants_only_after_the_commit() {
    let (mut reg, now) = hand_leader(5, true);
    let out = reg.handle(
        now,
        msg("s1", request(1, 1, 1, 1, Op::Claim(ident("Adel")))),
    );
    assert!(answers(&out).is_empty());
    // Taken even before the first grant is committed: no second grant.
    let out = reg.handle(
        now,
        msg("s2", request(1, 1, 1, 1, Op::Claim(ident("Adel")))),
    );
    assert_eq!(
        answers(&out)[0].2,
        Verdict::Refused {
            reason: Refusal::Taken
        }
    );
    let out = ack_all(&mut reg, now);
    assert_eq!(answers(&out).len(), 1);
}

#[test]
fn a_server_that_reported_to_a_newer_leader_never_acknowledges_the_older_one() {
    let now = Instant::now();
    let mut reg = Registry::new("s1".into(), ids(3), test_config(true), 1);
    reg.handle(now, Input::PeerUp("s2".into()));
    reg.handle(now, Input::PeerUp("s3".into()));
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some("s3".into()),
            term: 1,
        },
    );
    let snapshot = RegistryMessage::Snapshot {
        term: 1,
        seq: 0,
        identities: vec![],
        rooms: vec![],
        move_ages: vec![],
    };
    let out = reg.handle(now, msg("s3", snapshot));
    assert!(sent(&out, "s3").contains(&&RegistryMessage::Ack { term: 1, seq: 0 }));
    let announce = |seq, name: &str| RegistryMessage::Announce {
        term: 1,
        seq,
        changes: vec![Change::SetIdentity(entry(name, "s3", (1, seq, "s3")))],
    };
    let out = reg.handle(now, msg("s3", announce(1, "Adel")));
    assert!(sent(&out, "s3").contains(&&RegistryMessage::Ack { term: 1, seq: 1 }));
    // s2 runs for a newer term and asks for holdings: s1 reports them,
    // replica and position included, and is fenced.
    let out = reg.handle(now, msg("s2", RegistryMessage::HoldingsRequest { term: 2 }));
    let report = sent(&out, "s2")
        .into_iter()
        .find_map(|m| match m {
            RegistryMessage::Holdings { term: 2, report } => Some(report.clone()),
            _ => None,
        })
        .expect("reported to s2");
    assert_eq!(
        report.position,
        Position {
            term: 1,
            rank: 2,
            seq: 1
        }
    );
    assert_eq!(
        report.replica_identities,
        vec![entry("Adel", "s3", (1, 1, "s3"))]
    );
    // The older leader's next announcement is neither applied nor acknowledged.
    let out = reg.handle(now, msg("s3", announce(2, "Bob")));
    assert!(sent(&out, "s3").is_empty(), "{out:?}");
    assert_eq!(reg.identity_server("Bob"), None);
}

/// s4 of five, elected at term 2 by s1..s3, which it hears; it does not
/// hear s5.
fn s4_elected_without_s5(now: Instant) -> Registry {
    let mut reg = Registry::new("s4".into(), ids(5), test_config(true), 1);
    for peer in ["s1", "s2", "s3"] {
        reg.handle(now, Input::PeerUp(peer.into()));
    }
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some("s4".into()),
            term: 2,
        },
    );
    reg
}

#[test]
fn a_new_leader_keeps_the_names_of_a_server_it_cannot_hear_until_every_live_server_sees_it_down() {
    // s4 is elected at term 2 by s1..s3; it cannot hear s5, the old
    // leader, whose client holds "Adel" (committed at term 1: s1 has it).
    let now = Instant::now();
    let mut reg = s4_elected_without_s5(now);
    let adel = entry("Adel", "s5", (1, 3, "s5"));
    let advanced = HoldingsReport {
        incarnation: 1,
        version: 1,
        issued_below: 1,
        position: Position {
            term: 1,
            rank: 4,
            seq: 7,
        },
        replica_identities: vec![adel.clone()],
        ..Default::default()
    };
    let holdings = |report| RegistryMessage::Holdings { term: 2, report };
    reg.handle(now, msg("s2", holdings(empty_report(1))));
    assert!(
        !reg.leading.as_ref().expect("leads").based,
        "two of five reported: no base yet"
    );
    reg.handle(now, msg("s1", holdings(advanced)));
    assert_eq!(registered(&reg, "Adel"), Some(adel), "from s1's replica");
    reg.handle(now, msg("s3", holdings(empty_report(1))));
    ack_all(&mut reg, now);
    let out = reg.handle(
        now,
        msg("s3", request(2, 1, 1, 1, Op::Claim(ident("Adel")))),
    );
    assert_eq!(
        answers(&out)[0].2,
        Verdict::Refused {
            reason: Refusal::Taken
        }
    );
    // s1 sees s5 down too: two of five, s5 keeps its names.
    let down = |from| {
        msg(
            from,
            RegistryMessage::Liveness {
                term: 2,
                down: vec!["s5".into()],
            },
        )
    };
    let out = reg.handle(now, down("s1"));
    assert!(registered(&reg, "Adel").is_some(), "{out:?}");
    // s2 as well: a majority sees s5 down, but s3 still hears it (a
    // non-transitive cut: s5 is cut from s1, s2 and s4 only). s3 may talk to
    // s5, whose client holds "Adel": s5 keeps its names, or a client of s3
    // could be granted "Adel" while s5's holds it.
    let out = reg.handle(now, down("s2"));
    assert!(registered(&reg, "Adel").is_some(), "{out:?}");
    ack_all(&mut reg, now);
    let out = reg.handle(
        now,
        msg("s3", request(2, 1, 2, 2, Op::Claim(ident("Adel")))),
    );
    assert_eq!(
        answers(&out)[0].2,
        Verdict::Refused {
            reason: Refusal::Taken
        }
    );
    // s3 sees s5 down too: every live server does, its names are free.
    let out = reg.handle(now, down("s3"));
    assert!(out.contains(&Action::Log(LogEvent::ServerPurged {
        server: "s5".into(),
        identities: 1,
        rooms: 0,
    })));
    assert_eq!(registered(&reg, "Adel"), None);
    ack_all(&mut reg, now);
    let claim = request(2, 1, 3, 3, Op::Claim(ident("Adel")));
    let mut out = reg.handle(now, msg("s3", seeing_down(claim, &["s5"])));
    out.extend(ack_all(&mut reg, now));
    assert!(matches!(answers(&out)[0].2, Verdict::Granted { .. }));
}

/// Found by the faults test (seed 1, a fluttering partition {s1,s2} |
/// {s3,s4,s5}): the leader s5 and everyone it heard saw s1 down and freed
/// its names; s2, cut off with s1, was down for s5 then, so its view did
/// not count. s2 came back first, still hearing s1, and was granted a name
/// s1's client held: one name on two servers that talk. A server that
/// hears a server whose names were freed has its claims refused until it
/// sees that server down too (or that server is back and merged).
#[test]
fn a_server_that_still_hears_a_freed_server_is_not_given_its_names() {
    let (mut reg, now) = hand_leader(5, true);
    let mut out = reg.handle(
        now,
        msg("s1", request(1, 1, 1, 1, Op::Claim(ident("Adel")))),
    );
    out.extend(ack_all(&mut reg, now));
    assert!(matches!(answers(&out)[0].2, Verdict::Granted { .. }));
    // s1 and s2 are cut off from the rest.
    reg.handle(now, Input::PeerDown("s1".into()));
    reg.handle(now, Input::PeerDown("s2".into()));
    let mut out = Vec::new();
    for from in ["s3", "s4"] {
        let down = vec!["s1".into(), "s2".into()];
        let liveness = RegistryMessage::Liveness { term: 1, down };
        out.extend(reg.handle(now, msg(from, liveness)));
    }
    assert!(out.contains(&Action::Log(LogEvent::ServerPurged {
        server: "s1".into(),
        identities: 1,
        rooms: 0,
    })));
    ack_all(&mut reg, now);
    // s2 is back; s1 is not, and s2 still hears it.
    reg.handle(now, Input::PeerUp("s2".into()));
    // Its report (a newer one than its first) still hears s1.
    let report = RegistryMessage::Holdings {
        term: 1,
        report: HoldingsReport {
            version: 2,
            down: vec!["s3".into(), "s4".into(), "s5".into()],
            ..empty_report(1)
        },
    };
    reg.handle(now, msg("s2", report));
    ack_all(&mut reg, now);
    let claim = |id| request(1, 1, id, id, Op::Claim(ident("Adel")));
    let refused = |id| {
        vec![(
            "s2".to_string(),
            id,
            Verdict::Refused {
                reason: Refusal::HearsDownServer {
                    server: "s1".into(),
                },
            },
        )]
    };
    let out = reg.handle(now, msg("s2", claim(2)));
    assert_eq!(answers(&out), refused(2));
    // s1 flutters: seen up, and down again before its holdings came.
    reg.handle(now, Input::PeerUp("s1".into()));
    reg.handle(now, Input::PeerDown("s1".into()));
    let out = reg.handle(now, msg("s2", claim(3)));
    assert_eq!(answers(&out), refused(3), "s1's names were not merged back");
    // Nor is an identity re-homed to s2 by a move (s3 sees s1 down).
    let from_s3 = |id, op| msg("s3", seeing_down(request(1, 1, id, id, op), &["s1"]));
    let mut out = reg.handle(now, from_s3(1, Op::Claim(ident("Bob"))));
    let start = Op::MoveStart {
        identity: "Bob".into(),
        to: "s2".into(),
        proof: proof(),
    };
    out.extend(ack_all(&mut reg, now));
    out.extend(reg.handle(now, from_s3(2, start)));
    out.extend(ack_all(&mut reg, now));
    assert_eq!(answers(&out).len(), 2, "Bob granted and moving: {out:?}");
    let arrive = Op::MoveDone {
        identity: "Bob".into(),
        arrival: arrival(),
        stamp: None,
    };
    let out = reg.handle(now, msg("s2", request(1, 1, 4, 4, arrive)));
    assert_eq!(answers(&out), refused(4));
    // Once s2 sees s1 down too, the name is its to have.
    let mut out = reg.handle(now, msg("s2", seeing_down(claim(5), &["s1"])));
    out.extend(ack_all(&mut reg, now));
    assert!(
        matches!(answers(&out)[..], [(_, 5, Verdict::Granted { .. })]),
        "{out:?}"
    );
}

/// A freed server that is up again but never reports is left to the sync
/// wait, which ends at the sync timeout: it must not keep every server that
/// hears it from new names for ever.
#[test]
fn a_freed_server_up_again_holds_claims_back_only_until_the_sync_timeout() {
    let (mut reg, now) = hand_leader(5, true);
    reg.handle(now, Input::PeerDown("s1".into()));
    for from in ["s2", "s3", "s4"] {
        let down = vec!["s1".into()];
        reg.handle(now, msg(from, RegistryMessage::Liveness { term: 1, down }));
    }
    reg.handle(now, Input::PeerUp("s1".into()));
    let later = now + test_config(true).sync_timeout + ms(1);
    let claim = request(1, 1, 1, 1, Op::Claim(ident("Adel")));
    let mut out = reg.handle(later, msg("s2", claim));
    out.extend(ack_all(&mut reg, later));
    assert!(
        matches!(answers(&out)[..], [(_, 1, Verdict::Granted { .. })]),
        "{out:?}"
    );
}

/// A new leader does not know which servers an earlier one freed: a down
/// server holding nothing in its base counts as freed until its holdings
/// are merged, so a server that hears it gets none of the names. (The new
/// leader does not free it again itself: s2 still hears it.)
#[test]
fn a_new_leader_counts_a_down_server_holding_nothing_as_freed() {
    let now = Instant::now();
    let ids: Vec<ServerId> = (0..5).map(sid).collect();
    let mut reg = Registry::new(sid(4), ids, test_config(true), 1);
    // s5 leads s2, s3 and s4; s1 is down for all but s2, and holds nothing
    // in any replica (an earlier leader freed its names).
    for peer in ["s2", "s3", "s4"] {
        reg.handle(now, Input::PeerUp(peer.into()));
    }
    let lead = Input::LeaderChanged {
        leader: Some(sid(4)),
        term: 1,
    };
    reg.handle(now, lead);
    for (peer, down) in [("s2", vec![]), ("s3", vec!["s1"]), ("s4", vec!["s1"])] {
        let report = RegistryMessage::Holdings {
            term: 1,
            report: HoldingsReport {
                down: down.into_iter().map(String::from).collect(),
                ..empty_report(1)
            },
        };
        reg.handle(now, msg(peer, report));
    }
    ack_all(&mut reg, now);
    let claim = |id| request(1, 1, id, id, Op::Claim(ident("Adel")));
    let out = reg.handle(now, msg("s2", claim(1)));
    let refused = Verdict::Refused {
        reason: Refusal::HearsDownServer {
            server: "s1".into(),
        },
    };
    assert_eq!(answers(&out), vec![("s2".into(), 1, refused)]);
    let mut out = reg.handle(now, msg("s2", seeing_down(claim(2), &["s1"])));
    out.extend(ack_all(&mut reg, now));
    assert!(
        matches!(answers(&out)[..], [(_, 2, Verdict::Granted { .. })]),
        "{out:?}"
    );
}

#[test]
fn a_leader_left_with_a_minority_frees_no_names_though_every_live_server_sees_them_down() {
    // s4 leads at term 2 with s1..s3's reports; s5's client holds "Adel".
    // Then s2 and s3 go silent too: s4 hears only s1, and the two of them
    // see s2, s3 and s5 down. Every live server agrees, but two of five are
    // no majority: the names stay (the other three may be serving them).
    let now = Instant::now();
    let mut reg = s4_elected_without_s5(now);
    let adel = entry("Adel", "s5", (1, 3, "s5"));
    let with_adel = HoldingsReport {
        position: Position {
            term: 1,
            rank: 4,
            seq: 7,
        },
        replica_identities: vec![adel.clone()],
        ..empty_report(1)
    };
    let holdings = |report| RegistryMessage::Holdings { term: 2, report };
    reg.handle(now, msg("s1", holdings(with_adel)));
    reg.handle(now, msg("s2", holdings(empty_report(1))));
    reg.handle(now, msg("s3", holdings(empty_report(1))));
    ack_all(&mut reg, now);
    assert_eq!(registered(&reg, "Adel"), Some(adel.clone()));
    let mut out = reg.handle(now, Input::PeerDown("s2".into()));
    out.extend(reg.handle(now, Input::PeerDown("s3".into())));
    out.extend(reg.handle(
        now,
        msg(
            "s1",
            RegistryMessage::Liveness {
                term: 2,
                down: vec!["s2".into(), "s3".into(), "s5".into()],
            },
        ),
    ));
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Log(LogEvent::ServerPurged { .. }))),
        "{out:?}"
    );
    assert_eq!(registered(&reg, "Adel"), Some(adel));
}

#[test]
fn the_base_is_the_most_advanced_replica_of_the_quorum() {
    // Two followers report replicas of the old leader s3 at different
    // points: "Adel" was released at announcement 8, which only s2 saw.
    let now = Instant::now();
    let mut reg = Registry::new("s2".into(), ids(3), test_config(true), 1);
    // The new leader's own replica (empty, as of announcement 8) is further on.
    reg.applied = Position {
        term: 4,
        rank: 2,
        seq: 8,
    };
    reg.handle(now, Input::PeerUp("s1".into()));
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some("s2".into()),
            term: 5,
        },
    );
    let behind = HoldingsReport {
        incarnation: 1,
        version: 1,
        issued_below: 1,
        position: Position {
            term: 4,
            rank: 2,
            seq: 7,
        },
        replica_identities: vec![entry("Adel", "s3", (4, 2, "s3"))],
        ..Default::default()
    };
    reg.handle(
        now,
        msg(
            "s1",
            RegistryMessage::Holdings {
                term: 5,
                report: behind,
            },
        ),
    );
    assert!(reg.leading.as_ref().expect("leads").based);
    assert_eq!(registered(&reg, "Adel"), None, "released at 8");
}

/// A new leader counts a down server that holds nothing as freed (an
/// earlier leader may have freed it): a move to it ends then too, if every
/// live server sees it down (see
/// `unit::a_leader_that_does_not_hear_the_destination_yet_keeps_the_move`).
#[test]
fn a_new_leader_ends_the_moves_to_a_down_server_that_holds_nothing() {
    let now = Instant::now();
    let mut reg = Registry::new("s2".into(), ids(3), test_config(true), 1);
    reg.handle(now, Input::PeerUp("s1".into()));
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some("s2".into()),
            term: 5,
        },
    );
    let moving = |identity: &str, to: &str| IdentityEntry {
        moving_to: Some(to.into()),
        move_proof: Some(proof()),
        ..entry(identity, "s1", (4, 3, "s3"))
    };
    let report = HoldingsReport {
        incarnation: 1,
        version: 1,
        issued_below: 1,
        position: Position {
            term: 4,
            rank: 2,
            seq: 3,
        },
        identities: vec![moving("Adel", "s3"), moving("Cara", "s2")],
        replica_identities: vec![moving("Adel", "s3"), moving("Cara", "s2")],
        down: vec!["s3".into()],
        ..Default::default()
    };
    let holdings = RegistryMessage::Holdings { term: 5, report };
    reg.handle(now, msg("s1", holdings));
    ack_all(&mut reg, now);
    assert!(reg.leading.as_ref().expect("leads").based);
    assert_eq!(
        registered(&reg, "Adel"),
        None,
        "s3 is down and holds nothing"
    );
    assert_eq!(
        registered(&reg, "Cara")
            .and_then(|e| e.moving_to)
            .as_deref(),
        Some("s2"),
        "a move to a live server stays"
    );
}

#[test]
fn a_replaced_link_gets_the_unacknowledged_announcements_again() {
    let (mut reg, now) = hand_leader(3, true);
    let out = reg.handle(
        now,
        msg("s1", request(1, 1, 1, 1, Op::Claim(ident("Adel")))),
    );
    let seq = announced_seq(&out).expect("announced");
    let out = reg.handle(now + leader::SPREAD_WAIT, ack("s2", 1, seq));
    assert_eq!(answers(&out).len(), 1, "committed by s2 and the leader");
    // s1 never acknowledged: it gets the announcement again at once when
    // its link is replaced, and on the retry timer otherwise.
    let again = |out: &[Action]| {
        sent(out, "s1")
            .iter()
            .any(|m| matches!(m, RegistryMessage::Announce { seq: s, .. } if *s == seq))
    };
    let out = reg.handle(now, Input::LinkReset("s1".into()));
    assert!(again(&out), "{out:?}");
    let out = reg.handle(now + ms(200), Input::Timer(Timer::Retry));
    assert!(again(&out), "{out:?}");
    let out = reg.handle(now, ack("s1", 1, seq));
    assert!(out.is_empty() || !again(&out));
    let out = reg.handle(now + ms(400), Input::Timer(Timer::Retry));
    assert!(!again(&out), "acknowledged: not sent again");
}

#[test]
fn a_follower_whose_link_to_the_leader_was_replaced_resyncs() {
    let now = Instant::now();
    let mut reg = Registry::new("s1".into(), ids(3), test_config(true), 1);
    reg.handle(now, Input::PeerUp("s2".into()));
    reg.handle(now, Input::PeerUp("s3".into()));
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some("s3".into()),
            term: 1,
        },
    );
    reg.handle(
        now,
        Input::Local {
            token: 1,
            request: LocalRequest::Claim(ident("Adel")),
        },
    );
    let out = reg.handle(now, Input::LinkReset("s3".into()));
    let to_leader = sent(&out, "s3");
    assert!(
        to_leader
            .iter()
            .any(|m| matches!(m, RegistryMessage::Request { .. }))
    );
    assert!(
        to_leader
            .iter()
            .any(|m| matches!(m, RegistryMessage::Holdings { .. }))
    );
}

#[test]
fn a_report_made_at_an_older_term_is_not_merged() {
    let (mut reg, now) = hand_leader(3, true);
    let report = HoldingsReport {
        incarnation: 1,
        version: 2,
        issued_below: 1,
        identities: vec![entry("Adel", "s1", (0, 1, "s2"))],
        ..Default::default()
    };
    let out = reg.handle(
        now,
        msg("s1", RegistryMessage::Holdings { term: 0, report }),
    );
    assert_eq!(registered(&reg, "Adel"), None);
    assert!(sent(&out, "s1").contains(&&RegistryMessage::HoldingsRequest { term: 1 }));
}

#[test]
fn a_late_report_does_not_re_register_a_name_its_server_lost() {
    let (mut reg, now) = hand_leader(3, true);
    let report = |version, stamp| HoldingsReport {
        incarnation: 1,
        version,
        issued_below: 1,
        identities: vec![entry("Adel", "s1", stamp)],
        ..Default::default()
    };
    let holdings = |report| RegistryMessage::Holdings { term: 1, report };
    reg.handle(now, msg("s1", holdings(report(2, (0, 1, "s2")))));
    // s2's holder of "Adel" has the later grant: s1's is evicted.
    let later = HoldingsReport {
        incarnation: 1,
        version: 2,
        issued_below: 1,
        identities: vec![entry("Adel", "s2", (0, 2, "s2"))],
        ..Default::default()
    };
    let out = reg.handle(now, msg("s2", holdings(later)));
    assert!(
        sent(&out, "s1")
            .iter()
            .any(|m| matches!(m, RegistryMessage::Evict { .. }))
    );
    // A report s1 made before it heard of that still lists "Adel".
    let out = reg.handle(now, msg("s1", holdings(report(3, (0, 1, "s2")))));
    assert_eq!(
        registered(&reg, "Adel").map(|e| e.server).as_deref(),
        Some("s2")
    );
    assert!(
        sent(&out, "s1")
            .iter()
            .any(|m| matches!(m, RegistryMessage::Evict { .. }))
    );
}

#[test]
fn a_stale_move_expiry_timer_leaves_a_newer_move_alone() {
    let (mut reg, t0) = hand_leader(3, true);
    decide(&mut reg, t0, "s1", 1, Op::Claim(ident("Adel")));
    let to = |s: &str| Op::MoveStart {
        identity: "Adel".into(),
        to: s.into(),
        proof: proof(),
    };
    decide(&mut reg, t0, "s1", 2, to("s2"));
    let done = Op::MoveDone {
        identity: "Adel".into(),
        arrival: arrival(),
        stamp: None,
    };
    decide(&mut reg, t0 + ms(100), "s2", 1, done);
    // The client moves on from s2 at t0 + 500 ms: its move expires at t0 + 1500 ms.
    decide(&mut reg, t0 + ms(500), "s2", 2, to("s1"));
    let timeout = reg.config.move_timeout;
    reg.handle(
        t0 + timeout,
        Input::Timer(Timer::MoveExpiry {
            identity: "Adel".into(),
        }),
    );
    let moving = registered(&reg, "Adel").expect("still registered");
    assert_eq!(
        (moving.server.as_str(), moving.moving_to.as_deref()),
        ("s2", Some("s1"))
    );
    reg.handle(
        t0 + ms(500) + timeout,
        Input::Timer(Timer::MoveExpiry {
            identity: "Adel".into(),
        }),
    );
    assert_eq!(registered(&reg, "Adel"), None, "the second move expired");
}

/// A move to a server whose names the cluster frees ends with it: the
/// identity is free at once, not at the move timeout (a client whose new
/// server died can come back under its name), and the freed server's late
/// arrival is refused. A move to another server is left alone.
#[test]
fn a_move_to_a_freed_server_ends_when_it_is_freed() {
    let (mut reg, t0) = hand_leader(3, true);
    let start = |identity: &str, to: &str| Op::MoveStart {
        identity: identity.into(),
        to: to.into(),
        proof: proof(),
    };
    decide(&mut reg, t0, "s1", 1, Op::Claim(ident("Adel")));
    decide(&mut reg, t0, "s1", 2, Op::Claim(ident("Cara")));
    decide(&mut reg, t0, "s1", 3, start("Adel", "s2"));
    decide(&mut reg, t0, "s1", 4, start("Cara", "s3"));
    let mut out = reg.handle(t0, Input::PeerDown("s2".into()));
    let liveness = RegistryMessage::Liveness {
        term: 1,
        down: vec!["s2".into()],
    };
    out.extend(reg.handle(t0, msg("s1", liveness)));
    out.extend(ack_all(&mut reg, t0));
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Log(LogEvent::ServerPurged { .. }))),
        "s2 freed: {out:?}"
    );
    assert_eq!(registered(&reg, "Adel"), None, "its move ended with s2");
    assert_eq!(
        registered(&reg, "Cara")
            .and_then(|e| e.moving_to)
            .as_deref(),
        Some("s3"),
        "a move elsewhere stays"
    );
    // s2 was only cut off, and its client arrives: too late.
    reg.handle(t0, Input::PeerUp("s2".into()));
    let report = RegistryMessage::Holdings {
        term: 1,
        report: HoldingsReport {
            version: 2,
            ..empty_report(1)
        },
    };
    reg.handle(t0, msg("s2", report));
    let done = Op::MoveDone {
        identity: "Adel".into(),
        arrival: arrival(),
        stamp: None,
    };
    let refused = decide(&mut reg, t0, "s2", 1, done);
    assert_eq!(
        refused,
        vec![(
            "s2".into(),
            1,
            Verdict::Refused {
                reason: Refusal::NotMoving
            }
        )]
    );
    assert_eq!(registered(&reg, "Adel"), None);
}

/// A client's quit on the connection it was routed away from frees its
/// identity only while the identity is still on that move: not once it
/// arrived, and not once it came back to the same server by another move
/// with the same grant (found by a review: a plain release there freed the
/// name under the client holding it again).
#[test]
fn a_move_given_up_frees_only_the_move_it_names() {
    let (mut reg, t0) = hand_leader(3, true);
    let start = |to: &str, proof| Op::MoveStart {
        identity: "Adel".into(),
        to: to.into(),
        proof,
    };
    let give_up = |proof| Op::MoveGiveUp {
        identity: "Adel".into(),
        proof,
    };
    let done = |token: &str| Op::MoveDone {
        identity: "Adel".into(),
        arrival: Arrival {
            token: Some(token.into()),
            ..arrival()
        },
        stamp: None,
    };
    let back = MoveProof {
        token: "fedcba9876543210fedcba9876543210".into(),
        ..proof()
    };
    // Still on the move: freed.
    decide(&mut reg, t0, "s1", 1, Op::Claim(ident("Adel")));
    decide(&mut reg, t0, "s1", 2, start("s2", proof()));
    decide(&mut reg, t0, "s1", 3, give_up(proof()));
    assert_eq!(registered(&reg, "Adel"), None, "given up: free");
    // Moved s1 -> s2 -> s1, keeping its grant: the first move's give-up
    // changes nothing.
    decide(&mut reg, t0, "s1", 4, Op::Claim(ident("Adel")));
    decide(&mut reg, t0, "s1", 5, start("s2", proof()));
    decide(&mut reg, t0, "s2", 1, done(&proof().token));
    decide(&mut reg, t0, "s2", 2, start("s1", back.clone()));
    decide(&mut reg, t0, "s1", 6, done(&back.token));
    let held = registered(&reg, "Adel").expect("back on s1");
    assert_eq!(
        (held.server.as_str(), held.moving_to.as_deref()),
        ("s1", None)
    );
    decide(&mut reg, t0, "s1", 7, give_up(proof()));
    assert_eq!(registered(&reg, "Adel"), Some(held.clone()), "still held");
    // On its way again from s1: a give-up of another move leaves it moving.
    decide(&mut reg, t0, "s1", 8, start("s2", back.clone()));
    decide(&mut reg, t0, "s1", 9, give_up(proof()));
    assert_eq!(
        registered(&reg, "Adel")
            .and_then(|e| e.moving_to)
            .as_deref(),
        Some("s2")
    );
}

/// An arrival that names the move's grant completes only that move: one
/// naming another grant (a move the asker saw announced before the name
/// was freed and granted again) is refused and leaves the move open.
#[test]
fn an_arrival_completes_only_the_move_it_names() {
    let (mut reg, t0) = hand_leader(3, true);
    decide(&mut reg, t0, "s1", 1, Op::Claim(ident("Adel")));
    let start = Op::MoveStart {
        identity: "Adel".into(),
        to: "s2".into(),
        proof: proof(),
    };
    decide(&mut reg, t0, "s1", 2, start);
    let moving = registered(&reg, "Adel").expect("registered");
    let done = |stamp| Op::MoveDone {
        identity: "Adel".into(),
        arrival: arrival(),
        stamp,
    };
    let other = Stamp {
        seq: moving.stamp.seq + 100,
        ..moving.stamp.clone()
    };
    let refused = decide(&mut reg, t0, "s2", 1, done(Some(other.clone())));
    let not_moving = Verdict::Refused {
        reason: Refusal::NotMoving,
    };
    assert_eq!(refused, vec![("s2".into(), 1, not_moving.clone())]);
    assert_eq!(
        registered(&reg, "Adel"),
        Some(moving.clone()),
        "still moving"
    );
    let granted = decide(&mut reg, t0, "s2", 2, done(Some(moving.stamp.clone())));
    let verdict = Verdict::Granted {
        stamp: moving.stamp.clone(),
    };
    assert_eq!(granted, vec![("s2".into(), 2, verdict.clone())]);
    assert_eq!(
        registered(&reg, "Adel").map(|e| (e.server, e.moving_to)),
        Some(("s2".into(), None))
    );
    // Re-homed already (an earlier leader's answer lost): the retry of this
    // move is granted again, an arrival naming another grant is not.
    assert_eq!(
        decide(&mut reg, t0, "s2", 3, done(Some(other))),
        vec![("s2".into(), 3, not_moving)]
    );
    let retry = done(Some(moving.stamp.clone()));
    assert_eq!(
        decide(&mut reg, t0, "s2", 4, retry),
        vec![("s2".into(), 4, verdict)]
    );
}

#[test]
fn an_eviction_is_obeyed_only_from_the_leader_followed_at_its_term() {
    let now = Instant::now();
    let mut reg = Registry::new("s1".into(), ids(3), test_config(true), 1);
    reg.handle(now, Input::PeerUp("s2".into()));
    reg.handle(now, Input::PeerUp("s3".into()));
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some("s3".into()),
            term: 1,
        },
    );
    reg.handle(
        now,
        msg(
            "s3",
            RegistryMessage::Snapshot {
                term: 1,
                seq: 0,
                identities: vec![],
                rooms: vec![],
                move_ages: vec![],
            },
        ),
    );
    reg.handle(
        now,
        Input::Local {
            token: 1,
            request: LocalRequest::Claim(ident("Adel")),
        },
    );
    let adel = entry("Adel", "s1", (1, 1, "s3"));
    let answer = RegistryMessage::Answer {
        term: 1,
        incarnation: 1,
        id: 1,
        seq: 1,
        verdict: Verdict::Granted {
            stamp: adel.stamp.clone(),
        },
    };
    assert_eq!(
        replies(&reg.handle(now, msg("s3", answer))),
        vec![(1, Ok(()))]
    );
    let evict = |term| RegistryMessage::Evict {
        term,
        seq: 2,
        identities: vec![adel.clone()],
        rooms: vec![],
    };
    // s2 asks for holdings at term 2: s1 is fenced against s3's term 1.
    reg.handle(now, msg("s2", RegistryMessage::HoldingsRequest { term: 2 }));
    reg.handle(now, msg("s3", evict(1)));
    assert!(reg.holds(&ident("Adel")), "an older leader than the fence");
    reg.handle(now, msg("s2", evict(2)));
    assert!(reg.holds(&ident("Adel")), "not the leader s1 follows yet");
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some("s2".into()),
            term: 2,
        },
    );
    let out = reg.handle(now, msg("s2", evict(2)));
    assert!(!reg.holds(&ident("Adel")));
    assert!(out.contains(&Action::EvictLocal {
        identities: vec!["Adel".into()],
        rooms: vec![],
    }));
}

/// Found by tests/faults (seed 11, kinds leaderoneway): the leader s5 is
/// heard by nobody but hears everyone. The other four elect s4 at term 9;
/// s5, told of the election by a follower's `Election`, re-announces itself
/// at the same term 9 (its `Coordinator` is lost). s4's term grants a name
/// to a client of s2; s5's own client asks for the same name and s5, which
/// leads an epoch (9, s5) nobody follows yet, queues the claim. At the heal
/// the four adopt (9, s5), the newer epoch by rank, and s5 must not grant
/// the name s4's majority committed.
#[test]
fn a_leader_nobody_heard_does_not_grant_what_the_same_terms_lower_leader_committed() {
    let mut sim = Sim::new(5, 11, true);
    // s5 (index 4) leads at term 1. From now on nobody hears s5.
    sim.cut_oneway(&[4], &[0, 1, 2, 3]);
    sim.run_for(ms(200));
    let term = split_term_under_s5(&mut sim, ms(1));
    sim.run_for(ms(700));
    assert!(sim.node(3).is_leader() && sim.node(4).is_leader());
    let on_s5 = sim.claim(4, ident("user14"));
    sim.run_for(ms(100));
    let on_s2 = sim.claim(1, ident("user14"));
    sim.run_for(ms(300));
    assert_eq!(sim.result(on_s2), Some(&Ok(())), "s4's majority grants");
    assert!(sim.result(on_s5).is_none(), "s5 has no majority");
    heal_following_s5(&mut sim, term);
    assert_ne!(
        sim.result(on_s5),
        Some(&Ok(())),
        "s5 granted user14 while s2's client (granted by s4's majority) held it; holders: {:?}",
        sim.holdings().get(&ident("user14").key())
    );
}

/// Found by the faults test (seed 1, one-way cut of the leader): s5 led,
/// and s3's client released its name just as nobody could hear s5 any more.
/// s5 kept the release queued while it waited to build its base. The four
/// elected s4 at s5's new term; s4's majority granted the name to s2, then
/// (released again) to s3. On the heal s1 and s2 followed s5 first, s5
/// built its base (with s3's new grant in it), then decided the queued
/// release: it freed s3's new grant, and granted the name to s5's own
/// client while s3's client held it. A release now names the grant it
/// gives back (its stamp), and frees only that.
#[test]
fn a_leader_nobody_heard_does_not_grant_a_name_released_to_it_and_regranted_meanwhile() {
    regranted_while_a_cut_off_leader_kept_the_release(
        |_| ident("user07"),
        let_go_as_the_cut_starts,
    );
}

/// The same history for a room id: the release of a room names its grant
/// too.
#[test]
fn a_leader_nobody_heard_does_not_grant_a_room_released_to_it_and_regranted_meanwhile() {
    regranted_while_a_cut_off_leader_kept_the_release(
        |m| room("room07", &format!("owner{m}")),
        let_go_as_the_cut_starts,
    );
}

/// The same history for an arrival whose answer never came: s3 gives up
/// on its `movejoin` as the cut starts; the grant, when it comes, is kept
/// for the client's retry until the move timeout, and the release that
/// then undoes it names the move's grant, as s3's replica showed the move.
#[test]
fn a_leader_nobody_heard_does_not_grant_an_arrival_given_up_and_regranted_meanwhile() {
    regranted_while_a_cut_off_leader_kept_the_release(
        |_| ident("user07"),
        give_up_an_arrival_as_the_cut_starts,
    );
}

/// s3 claims `name(2)`; s3's client lets go of it as the one-way cut of
/// s5 starts: s5 hears the release.
fn let_go_as_the_cut_starts(sim: &mut Sim, seed: u64, name: &dyn Fn(usize) -> Name) {
    let held = sim.claim(2, name(2));
    sim.run_for(ms(300));
    assert_eq!(
        sim.result(held),
        Some(&Ok(())),
        "seed {seed}: s3's first grant"
    );
    sim.cut_oneway(&[4], &[0, 1, 2, 3]);
    sim.local(2, LocalRequest::Release(vec![name(2)]));
}

/// The same history for an arrival that reached s3 before the move's
/// announcement did: s3's `MoveDone` cannot name the move's grant. s3 must
/// not undo it with a release of whatever it holds under the name: it
/// keeps the arrival in flight until an answer names the grant.
#[test]
fn a_leader_nobody_heard_does_not_grant_an_unannounced_arrival_given_up_and_regranted_meanwhile() {
    regranted_while_a_cut_off_leader_kept_the_release(
        |_| ident("user07"),
        give_up_an_unannounced_arrival_as_the_cut_starts,
    );
}

/// A client of s1 moves to s3; s5 grants the arrival, but its answer to s3
/// is lost, and s3 tells its client no just as the one-way cut of s5
/// starts (the arrival stays in flight: see `Registry::unclaimed`).
fn give_up_an_arrival_as_the_cut_starts(sim: &mut Sim, seed: u64, name: &dyn Fn(usize) -> Name) {
    give_up_an_arrival(sim, seed, name, false);
}

/// [`give_up_an_arrival_as_the_cut_starts`], with the announcements to s3
/// lost from before the move: its arrival comes first.
fn give_up_an_unannounced_arrival_as_the_cut_starts(
    sim: &mut Sim,
    seed: u64,
    name: &dyn Fn(usize) -> Name,
) {
    give_up_an_arrival(sim, seed, name, true);
}

fn give_up_an_arrival(sim: &mut Sim, seed: u64, name: &dyn Fn(usize) -> Name, unannounced: bool) {
    let Name::Identity(identity) = name(0) else {
        unreachable!("a move is of an identity");
    };
    let held = sim.claim(0, name(0));
    sim.run_for(ms(300));
    if unannounced {
        sim.lose = Some(Box::new(|_, to, m| {
            to == 2 && matches!(m, RegistryMessage::Announce { .. })
        }));
    }
    let start = sim.local(
        0,
        LocalRequest::StartMove {
            identity: identity.clone(),
            to: sid(2),
            proof: proof(),
        },
    );
    sim.run_for(ms(300));
    assert_eq!(
        (sim.result(held), sim.result(start)),
        (Some(&Ok(())), Some(&Ok(()))),
        "seed {seed}: s1's grant and move"
    );
    sim.lose = Some(Box::new(move |_, to, m| {
        to == 2
            && (matches!(m, RegistryMessage::Answer { .. })
                || unannounced && matches!(m, RegistryMessage::Announce { .. }))
    }));
    let arrived = sim.local(
        2,
        LocalRequest::AcceptMove {
            identity,
            arrival: arrival(),
        },
    );
    sim.run_for(sim.cfg.claim_timeout - ms(1));
    sim.cut_oneway(&[4], &[0, 1, 2, 3]);
    sim.run_for(ms(1));
    assert_eq!(
        sim.result(arrived),
        Some(&Err(Refusal::LeaderTimeout)),
        "seed {seed}: s3 gave up on the arrival"
    );
    sim.lose = None;
}

/// The history of the faults test's seed 1, over 40 seeds, for the name
/// `name(m)` claims on server index `m` (a room's owner is claimed there
/// first): `let_go` ends with s3 letting go of the name as s5 is cut off
/// one way; s4's majority then grants the name to s2 and, released, to s3
/// again; s5's own client asks for it; after the heal everyone follows s5.
fn regranted_while_a_cut_off_leader_kept_the_release(
    name: impl Fn(usize) -> Name,
    let_go: fn(&mut Sim, u64, &dyn Fn(usize) -> Name),
) {
    for seed in 0..40 {
        let mut sim = Sim::new(5, seed, true);
        let key = name(0).key();
        for m in [1, 2, 4] {
            if let Name::Room { owner, .. } = name(m) {
                let owner = sim.claim(m, ident(&owner));
                sim.run_for(ms(300));
                assert_eq!(sim.result(owner), Some(&Ok(())), "seed {seed}: owner");
            }
        }
        let_go(&mut sim, seed, &name);
        sim.run_for(ms(5));
        let term = split_term_under_s5(&mut sim, ms(100));
        // An arrival whose client was told no is kept for its retry until
        // the move timeout, then given back.
        sim.run_for(ms(900) + sim.cfg.move_timeout);
        let on_s2 = sim.claim(1, name(1));
        sim.run_for(ms(300));
        assert_eq!(
            sim.result(on_s2),
            Some(&Ok(())),
            "seed {seed}: s4 grants s2"
        );
        sim.local(1, LocalRequest::Release(vec![name(1)]));
        sim.run_for(ms(200));
        let on_s3 = sim.claim(2, name(2));
        sim.run_for(ms(300));
        assert_eq!(
            sim.result(on_s3),
            Some(&Ok(())),
            "seed {seed}: s4 grants s3"
        );
        let on_s5 = sim.claim(4, name(4));
        sim.run_for(ms(300));
        heal_following_s5(&mut sim, term);
        assert_ne!(
            sim.result(on_s5),
            Some(&Ok(())),
            "seed {seed}: s5 granted {key:?} while s3's client held it; holders: {:?}",
            sim.holdings().get(&key)
        );
    }
}

/// With s5 (index 4) cut off one way: the four others elect s4 (index 3)
/// at term 2 after `four_after`, and s5 announces itself at term 2 after
/// 1 ms. Returns the term.
fn split_term_under_s5(sim: &mut Sim, four_after: Duration) -> u64 {
    let term = 2;
    for m in 0..4 {
        sim.tell_leader(m, 3, term, four_after);
    }
    sim.tell_leader(4, 4, term, ms(1));
    term
}

/// Heals every cut; s1 and s2 follow s5, the newer epoch of `term`, first.
fn heal_following_s5(sim: &mut Sim, term: u64) {
    sim.heal();
    for m in 0..2 {
        sim.tell_leader(m, 4, term, ms(1));
    }
    sim.run_for(ms(1500));
}

// A new leader counts every down server that holds nothing in its base as
// freed, the leader before it too. Exempting that leader (it merged its own
// holdings when it began to lead) would end a stall a fault tester found: a
// leader with no clients, cut off from the next-highest server alone, keeps
// every server that still hears it from new names for the whole cut. Each
// test below is a way two reviews found for such an exemption to give one
// name to two servers that talk, however it was narrowed (the base's
// leader's own report, a restarted reporter, quorum "none", a reporter that
// restarts after its report); each fails with it.

/// s5 led term 1 and its client holds "Adel" (s5's own holding, so NOT in
/// s5's own replica). s4 leads term 2; s5 flaps up at s4 long enough to
/// answer the holdings request, then s4 loses it again (s5<->s4 cut), before
/// s1's report completes the quorum. s5's report is the most advanced (a
/// leader's position is never behind its followers', and the tie-break of
/// `max_by_key` picks the last, "s5"), so the base is s5's *replica*: it
/// lacks s5's own names, and s5's holdings are not merged (s5 is down).
/// Were s5, the base's leader, not counted as freed, s2, which hears s5,
/// would be granted "Adel" while s5's client holds it.
#[test]
fn a_base_from_the_old_leaders_own_report_keeps_it_counted_as_freed() {
    let now = Instant::now();
    let ids: Vec<ServerId> = (0..5).map(sid).collect();
    let mut reg = Registry::new(sid(3), ids, test_config(true), 1);
    for peer in ["s1", "s2", "s3", "s5"] {
        reg.handle(now, Input::PeerUp(peer.into()));
    }
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some(sid(3)),
            term: 2,
        },
    );
    let of_s5 = Position {
        term: 1,
        rank: 4,
        seq: 7,
    };
    let adel = entry("Adel", "s5", (1, 3, "s5"));
    // s5's own report: its own holding, its replica (without its own names).
    let s5_report = HoldingsReport {
        position: of_s5,
        identities: vec![adel.clone()],
        ..empty_report(1)
    };
    reg.handle(now, msg("s5", holdings(s5_report)));
    // The cut: s4 no longer hears s5; s1..s3 still do.
    reg.handle(now, Input::PeerDown("s5".into()));
    // Followers of s5, fully caught up: their replicas show Adel on s5.
    let follower = || HoldingsReport {
        position: of_s5,
        replica_identities: vec![adel.clone()],
        ..empty_report(1)
    };
    for peer in ["s1", "s2", "s3"] {
        reg.handle(now, msg(peer, holdings(follower())));
    }
    ack_all(&mut reg, now);
    refused_as_hearing(&mut reg, now, "s2", "s5");
}

/// quorum = "none", 3 servers: s3 led term 1, s2 applied its announcements
/// up to 4; s3 then granted its own client "Adel" at 5 (committed at once:
/// quorum 1), which s2 never got. s3<->s2 cut; s2 leads term 2 and builds
/// its base from its own report alone (quorum 1). s3 holds nothing in it:
/// were it, the base's leader, not counted as freed, s1, which hears s3,
/// would be granted "Adel".
#[test]
fn without_a_majority_quorum_the_old_leader_stays_counted_as_freed() {
    let now = Instant::now();
    let ids: Vec<ServerId> = (0..3).map(sid).collect();
    let mut reg = Registry::new(sid(1), ids, test_config(false), 1);
    for peer in ["s1", "s3"] {
        reg.handle(now, Input::PeerUp(peer.into()));
    }
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some(sid(2)),
            term: 1,
        },
    );
    reg.handle(
        now,
        msg(
            "s3",
            RegistryMessage::Snapshot {
                term: 1,
                seq: 4,
                identities: vec![],
                rooms: vec![],
                move_ages: vec![],
            },
        ),
    );
    assert_eq!(
        reg.applied,
        Position {
            term: 1,
            rank: 2,
            seq: 4
        }
    );
    // s3's announcement 5 (Adel to s3) is lost to s2; then the cut.
    reg.handle(now, Input::PeerDown("s3".into()));
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some(sid(1)),
            term: 2,
        },
    );
    reg.handle(now, msg("s1", holdings(empty_report(1))));
    refused_as_hearing(&mut reg, now, "s1", "s3");
}

/// Majority quorum, 3 servers, a restart: s3 led term 1 and granted its own
/// client "Adel" at announcement 2, acknowledged by s2 (s3 + s2: committed);
/// s1 only has 1. s2 restarts (kill -9: replica gone, position default) and
/// is cut from s3; s2 leads term 2 with s1's report (s1 still hears s3). The
/// base is s1's replica at (1, s3, 1): no Adel, s3 holds nothing in it;
/// were s3, the base's leader, not counted as freed, s1 would get "Adel".
#[test]
fn a_restarted_reporter_keeps_the_old_leader_counted_as_freed() {
    let now = Instant::now();
    let ids: Vec<ServerId> = (0..3).map(sid).collect();
    let mut reg = Registry::new(sid(1), ids, test_config(true), 2);
    reg.handle(now, Input::PeerUp("s1".into()));
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some(sid(1)),
            term: 2,
        },
    );
    let s1_report = HoldingsReport {
        position: Position {
            term: 1,
            rank: 2,
            seq: 1,
        },
        ..empty_report(1)
    };
    reg.handle(now, msg("s1", holdings(s1_report)));
    refused_as_hearing(&mut reg, now, "s1", "s3");
}

/// A reporter that restarts after its report was kept (even with every
/// report at the old leader's term and the base not its own replica).
/// 5 servers, majority. s5 led term 1 (rank 4); s1..s4 applied its
/// snapshot at 1. s4<->s5 cut; s4 leads term 2. s1 reports (1, s5, 1) to
/// s4, then is killed and restarts (term forgotten), re-follows s5 (term 1),
/// applies its snapshot 1 and acknowledges announcement 2 (Adel to s5's own
/// client), as does s3: s5 + s1 + s3 is a majority, Adel is committed and
/// s5's client holds it. s2 then reports (1, s5, 1). s4 builds its base from
/// s4, s1 (the kept, pre-restart report), s2: all at epoch (1, s5), best is
/// not s5's own. Were s5 exempt (it holds nothing in the base), s2, which
/// hears s5, would be granted Adel while s5's client holds it.
#[test]
fn a_reporter_restarting_after_its_report_keeps_the_old_leader_counted_as_freed() {
    let now = Instant::now();
    let ids: Vec<ServerId> = (0..5).map(sid).collect();
    let mut reg = Registry::new(sid(3), ids, test_config(true), 1);
    for peer in ["s1", "s2", "s3", "s5"] {
        reg.handle(now, Input::PeerUp(peer.into()));
    }
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some(sid(4)),
            term: 1,
        },
    );
    let snap = RegistryMessage::Snapshot {
        term: 1,
        seq: 1,
        identities: vec![],
        rooms: vec![],
        move_ages: vec![],
    };
    reg.handle(now, msg("s5", snap));
    reg.handle(now, Input::PeerDown("s5".into()));
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some(sid(3)),
            term: 2,
        },
    );
    let of_s5 = Position {
        term: 1,
        rank: 4,
        seq: 1,
    };
    let report = || {
        holdings(HoldingsReport {
            position: of_s5,
            ..empty_report(1)
        })
    };
    reg.handle(now, msg("s1", report()));
    assert!(!reg.leading.as_ref().expect("leads").based);
    // s1 restarts, re-follows s5, acknowledges Adel (committed at s5 with
    // s1 and s3): s4 sees none of it (a fast restart its detector missed).
    reg.handle(now, msg("s2", report()));
    assert!(reg.leading.as_ref().expect("leads").based);
    ack_all(&mut reg, now);
    // s3 (cut from s4 after all, following s5) has not reported: past the
    // sync deadline, claims no longer wait for it.
    let now = now + ms(60_000);
    reg.handle(now, Input::Timer(Timer::SyncDeadline));
    refused_as_hearing(&mut reg, now, "s2", "s5");
}

/// A report to the leader of term 2.
fn holdings(report: HoldingsReport) -> RegistryMessage {
    RegistryMessage::Holdings { term: 2, report }
}

/// `asker` claims "Adel" from the leader of term 2, which refuses it: the
/// asker still hears `freed`, counted as freed.
fn refused_as_hearing(reg: &mut Registry, now: Instant, asker: &str, freed: &str) {
    let mut out = reg.handle(
        now,
        msg(asker, request(2, 1, 1, 1, Op::Claim(ident("Adel")))),
    );
    out.extend(ack_all(reg, now));
    let refused = Verdict::Refused {
        reason: Refusal::HearsDownServer {
            server: freed.into(),
        },
    };
    assert_eq!(answers(&out), vec![(asker.into(), 1, refused)]);
}

/// An identity that moves away and back keeps its grant's stamp: its
/// server's next report lists it under that stamp, and it is that server's
/// again, not a holding the leader took from it (a chaos seed had it evicted
/// there and granted to another).
#[test]
fn an_identity_moved_away_and_back_is_not_stale_in_its_servers_report() {
    let (mut reg, now) = hand_leader(3, true);
    decide(&mut reg, now, "s1", 1, Op::Claim(ident("Adel")));
    let start = |to: &str| Op::MoveStart {
        identity: "Adel".into(),
        to: to.into(),
        proof: proof(),
    };
    let done = Op::MoveDone {
        identity: "Adel".into(),
        arrival: arrival(),
        stamp: None,
    };
    decide(&mut reg, now, "s1", 2, start("s2"));
    decide(&mut reg, now, "s2", 1, done.clone());
    decide(&mut reg, now, "s2", 2, start("s1"));
    let back = decide(&mut reg, now, "s1", 3, done);
    assert!(
        matches!(back.as_slice(), [(_, 3, Verdict::Granted { .. })]),
        "{back:?}"
    );
    let entry = registered(&reg, "Adel").expect("registered");
    assert_eq!(entry.server, "s1");
    let report = HoldingsReport {
        incarnation: 1,
        version: 2,
        issued_below: 4,
        identities: vec![entry],
        ..Default::default()
    };
    let out = reg.handle(
        now,
        msg("s1", RegistryMessage::Holdings { term: 1, report }),
    );
    assert!(
        !out.iter().any(|a| matches!(
            a,
            Action::Send {
                msg: RegistryMessage::Evict { .. },
                ..
            }
        )),
        "{out:?}"
    );
    assert_eq!(
        registered(&reg, "Adel").map(|e| e.server).as_deref(),
        Some("s1")
    );
}

/// A request sent again while its committed grant waits for a live
/// follower gets no answer of its own: the held one goes, once.
#[test]
fn a_request_sent_again_during_the_spread_wait_is_answered_once() {
    let (mut reg, now) = hand_leader(3, true);
    let claim = request(1, 1, 1, 1, Op::Claim(ident("Adel")));
    let out = reg.handle(now, msg("s1", claim.clone()));
    let seq = announced_seq(&out).expect("announced");
    let out = reg.handle(now, ack("s1", 1, seq));
    assert!(answers(&out).is_empty(), "committed, s2 not there yet");
    let out = reg.handle(now + ms(1), msg("s1", claim));
    assert!(answers(&out).is_empty(), "no early copy: {out:?}");
    let out = reg.handle(now + ms(2), ack("s2", 1, seq));
    assert_eq!(answers(&out).len(), 1);
}

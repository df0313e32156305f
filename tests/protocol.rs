//! Conformance with shared/PROTOCOL.md on one server, rule by rule: exact lines
//! in exact order, over TCP and the same scenarios over QUIC and WebSocket.

mod common;

use common::{Raw, Via, room_change, start_node};

const HALL: &str = "MainHall-s1";

/// Runs each scenario over the three transports.
macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {
        mod tcp {
            $(#[tokio::test] async fn $name() { super::$name(super::Via::Tcp).await })*
        }
        mod quic {
            $(#[tokio::test] async fn $name() { super::$name(super::Via::Quic).await })*
        }
        mod ws {
            $(#[tokio::test] async fn $name() { super::$name(super::Via::Ws).await })*
        }
    };
}

both_transports!(
    newidentity_approved_and_announced_to_the_hall,
    newidentity_invalid_or_taken_is_refused_and_closed,
    list_has_every_room,
    who_names_members_and_owner,
    createroom_moves_the_owner_and_tells_the_former_room,
    createroom_refusals,
    joinroom_local_tells_former_and_new_room,
    joinroom_refusals_answer_only_the_client,
    deleteroom_moves_everyone_to_the_hall,
    deleteroom_refusals,
    message_goes_to_every_other_member,
    quit_of_an_owner_deletes_the_room_first,
    abrupt_disconnect_is_a_quit_without_reply,
    movejoin_for_an_identity_not_moving_here_is_refused,
    requests_before_newidentity_get_an_error,
);

async fn newidentity_approved_and_announced_to_the_hall(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut maria = Raw::connect(via, addr, "Maria").await;
    maria
        .send(r#"{"type":"newidentity","identity":"Maria"}"#)
        .await;
    maria
        .expect(r#"{"type":"newidentity","approved":"true"}"#)
        .await;
    maria.expect(&room_change("Maria", "", HALL)).await;
    adel.expect(&room_change("Maria", "", HALL)).await;
    adel.expect_nothing_more().await;
    maria.expect_nothing_more().await;
    node.stop().await;
}

async fn newidentity_invalid_or_taken_is_refused_and_closed(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    for bad in ["Adel", "ab", "1abc", "Has-Dash", "A2345678901234567"] {
        let mut c = Raw::connect(via, addr, bad).await;
        c.send(&format!(r#"{{"type":"newidentity","identity":"{bad}"}}"#))
            .await;
        c.expect(r#"{"type":"newidentity","approved":"false"}"#)
            .await;
        c.expect_closed().await;
    }
    // Nobody was announced, and the refused name is still Adel's.
    adel.send(r#"{"type":"who"}"#).await;
    adel.expect(
        r#"{"type":"roomcontents","roomid":"MainHall-s1","identities":["Adel"],"owner":""}"#,
    )
    .await;
    node.stop().await;
}

async fn list_has_every_room(via: Via) {
    let node = start_node().await;
    let mut adel = Raw::join(via, node.client_addr(), "Adel", HALL).await;
    adel.send(r#"{"type":"list"}"#).await;
    adel.expect(r#"{"type":"roomlist","rooms":["MainHall-s1"]}"#)
        .await;
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    adel.send(r#"{"type":"list"}"#).await;
    adel.expect(r#"{"type":"roomlist","rooms":["MainHall-s1","jokes"]}"#)
        .await;
    node.stop().await;
}

async fn who_names_members_and_owner(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    bob.send(r#"{"type":"who"}"#).await;
    bob.expect(
        r#"{"type":"roomcontents","roomid":"MainHall-s1","identities":["Adel","Bob"],"owner":""}"#,
    )
    .await;
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    adel.send(r#"{"type":"who"}"#).await;
    adel.expect(r#"{"type":"roomcontents","roomid":"jokes","identities":["Adel"],"owner":"Adel"}"#)
        .await;
    node.stop().await;
}

async fn createroom_moves_the_owner_and_tells_the_former_room(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.expect(&room_change("Adel", HALL, "jokes")).await;
    adel.expect_nothing_more().await;
    bob.expect_nothing_more().await;
    node.stop().await;
}

async fn createroom_refusals(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.expect(&room_change("Adel", HALL, "jokes")).await;
    // Taken, a main hall, invalid ids.
    for taken in ["jokes", HALL, "no", "9lives", "bad-name"] {
        bob.send(&format!(r#"{{"type":"createroom","roomid":"{taken}"}}"#))
            .await;
        bob.expect(&format!(
            r#"{{"type":"createroom","roomid":"{taken}","approved":"false"}}"#
        ))
        .await;
    }
    // An owner cannot create a second room.
    adel.send(r#"{"type":"createroom","roomid":"puns"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"puns","approved":"false"}"#)
        .await;
    adel.expect_nothing_more().await;
    bob.expect_nothing_more().await;
    node.stop().await;
}

async fn joinroom_local_tells_former_and_new_room(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    let mut cara = Raw::join(via, addr, "Cara", HALL).await;
    adel.expect(&room_change("Cara", "", HALL)).await;
    bob.expect(&room_change("Cara", "", HALL)).await;
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.expect(&room_change("Adel", HALL, "jokes")).await;
    cara.expect(&room_change("Adel", HALL, "jokes")).await;

    bob.send(r#"{"type":"joinroom","roomid":"jokes"}"#).await;
    let moved = room_change("Bob", HALL, "jokes");
    bob.expect(&moved).await;
    adel.expect(&moved).await;
    cara.expect(&moved).await;
    bob.send(r#"{"type":"who"}"#).await;
    bob.expect(
        r#"{"type":"roomcontents","roomid":"jokes","identities":["Adel","Bob"],"owner":"Adel"}"#,
    )
    .await;

    // Back to the hall: the room left and the hall both hear it, once each.
    bob.send(&format!(r#"{{"type":"joinroom","roomid":"{HALL}"}}"#))
        .await;
    let back = room_change("Bob", "jokes", HALL);
    bob.expect(&back).await;
    adel.expect(&back).await;
    cara.expect(&back).await;
    for c in [&mut adel, &mut bob, &mut cara] {
        c.expect_nothing_more().await;
    }
    node.stop().await;
}

async fn joinroom_refusals_answer_only_the_client(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    // No such room.
    bob.send(r#"{"type":"joinroom","roomid":"nowhere"}"#).await;
    bob.expect(&room_change("Bob", "nowhere", "nowhere")).await;
    // The same room.
    bob.send(&format!(r#"{{"type":"joinroom","roomid":"{HALL}"}}"#))
        .await;
    bob.expect(&room_change("Bob", HALL, HALL)).await;
    // No room id: refused with the room the client is in, as
    // roomchange(I, "", "") would tell it that it quit.
    bob.send(r#"{"type":"joinroom","roomid":""}"#).await;
    bob.expect(&room_change("Bob", HALL, HALL)).await;
    // An owner cannot leave its room by joining another.
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.expect(&room_change("Adel", HALL, "jokes")).await;
    adel.send(&format!(r#"{{"type":"joinroom","roomid":"{HALL}"}}"#))
        .await;
    adel.expect(&room_change("Adel", HALL, HALL)).await;
    adel.expect_nothing_more().await;
    bob.expect_nothing_more().await;
    node.stop().await;
}

async fn deleteroom_moves_everyone_to_the_hall(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    let mut cara = Raw::join(via, addr, "Cara", HALL).await;
    adel.expect(&room_change("Cara", "", HALL)).await;
    bob.expect(&room_change("Cara", "", HALL)).await;
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.expect(&room_change("Adel", HALL, "jokes")).await;
    cara.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.send(r#"{"type":"joinroom","roomid":"jokes"}"#).await;
    for c in [&mut bob, &mut adel, &mut cara] {
        c.expect(&room_change("Bob", HALL, "jokes")).await;
    }

    adel.send(r#"{"type":"deleteroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"deleteroom","roomid":"jokes","approved":"true"}"#)
        .await;
    // Each member's move, in room order, to the room's members and the hall.
    for c in [&mut adel, &mut bob, &mut cara] {
        c.expect(&room_change("Adel", "jokes", HALL)).await;
        c.expect(&room_change("Bob", "jokes", HALL)).await;
    }
    adel.send(r#"{"type":"list"}"#).await;
    adel.expect(r#"{"type":"roomlist","rooms":["MainHall-s1"]}"#)
        .await;
    // The id is free again.
    bob.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    bob.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    for c in [&mut bob, &mut adel, &mut cara] {
        c.expect(&room_change("Bob", HALL, "jokes")).await;
        c.expect_nothing_more().await;
    }
    node.stop().await;
}

async fn deleteroom_refusals(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.expect(&room_change("Adel", HALL, "jokes")).await;
    for room in ["jokes", "nowhere", HALL] {
        bob.send(&format!(r#"{{"type":"deleteroom","roomid":"{room}"}}"#))
            .await;
        bob.expect(&format!(
            r#"{{"type":"deleteroom","roomid":"{room}","approved":"false"}}"#
        ))
        .await;
    }
    adel.expect_nothing_more().await;
    bob.expect_nothing_more().await;
    node.stop().await;
}

async fn message_goes_to_every_other_member(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    let mut cara = Raw::join(via, addr, "Cara", HALL).await;
    adel.expect(&room_change("Cara", "", HALL)).await;
    bob.expect(&room_change("Cara", "", HALL)).await;
    // Cara goes to her own room: she must not hear the hall.
    cara.send(r#"{"type":"createroom","roomid":"quiet"}"#).await;
    cara.expect(r#"{"type":"createroom","roomid":"quiet","approved":"true"}"#)
        .await;
    cara.expect(&room_change("Cara", HALL, "quiet")).await;
    adel.expect(&room_change("Cara", HALL, "quiet")).await;
    bob.expect(&room_change("Cara", HALL, "quiet")).await;

    let tricky = "He said \"hi\" \\ then\nleft 😀";
    let line = serde_json::json!({"type": "message", "content": tricky}).to_string();
    adel.send(&line).await;
    let got = bob.next().await.expect("bob gets the message");
    assert_eq!(
        got,
        serde_json::json!({"type":"message","identity":"Adel","content":tricky})
    );
    for c in [&mut adel, &mut bob, &mut cara] {
        c.expect_nothing_more().await;
    }
    node.stop().await;
}

async fn quit_of_an_owner_deletes_the_room_first(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    adel.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    adel.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.expect(&room_change("Adel", HALL, "jokes")).await;

    adel.send(r#"{"type":"quit"}"#).await;
    adel.expect(&room_change("Adel", "jokes", HALL)).await;
    adel.expect(&room_change("Adel", HALL, "")).await;
    adel.expect_closed().await;
    bob.expect(&room_change("Adel", "jokes", HALL)).await;
    bob.expect(&room_change("Adel", HALL, "")).await;
    bob.send(r#"{"type":"list"}"#).await;
    bob.expect(r#"{"type":"roomlist","rooms":["MainHall-s1"]}"#)
        .await;
    // The identity is free again.
    let again = Raw::join(via, addr, "Adel", HALL).await;
    bob.expect(&room_change("Adel", "", HALL)).await;
    drop(again);
    node.stop().await;
}

async fn abrupt_disconnect_is_a_quit_without_reply(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    let mut bob = Raw::join(via, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;
    bob.send(r#"{"type":"createroom","roomid":"jokes"}"#).await;
    bob.expect(r#"{"type":"createroom","roomid":"jokes","approved":"true"}"#)
        .await;
    bob.expect(&room_change("Bob", HALL, "jokes")).await;
    adel.expect(&room_change("Bob", HALL, "jokes")).await;
    adel.send(r#"{"type":"joinroom","roomid":"jokes"}"#).await;
    adel.expect(&room_change("Adel", HALL, "jokes")).await;
    bob.expect(&room_change("Adel", HALL, "jokes")).await;

    drop(bob);
    adel.expect(&room_change("Bob", "jokes", HALL)).await;
    adel.expect(&room_change("Adel", "jokes", HALL)).await;
    adel.expect(&room_change("Bob", HALL, "")).await;
    adel.send(r#"{"type":"who"}"#).await;
    adel.expect(
        r#"{"type":"roomcontents","roomid":"MainHall-s1","identities":["Adel"],"owner":""}"#,
    )
    .await;
    node.stop().await;
}

async fn movejoin_for_an_identity_not_moving_here_is_refused(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(via, addr, "Adel", HALL).await;
    for who in ["Adel", "Zed"] {
        let mut forger = Raw::connect(via, addr, "forger").await;
        forger
            .send(&format!(
                r#"{{"type":"movejoin","former":"MainHall-s2","roomid":"{HALL}","identity":"{who}"}}"#
            ))
            .await;
        forger
            .expect(r#"{"type":"serverchange","approved":"false","serverid":"s1"}"#)
            .await;
        forger.expect_closed().await;
    }
    adel.expect_nothing_more().await;
    node.stop().await;
}

async fn requests_before_newidentity_get_an_error(via: Via) {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut c = Raw::connect(via, addr, "early").await;
    for line in [
        r#"{"type":"list"}"#,
        r#"{"type":"message","content":"hi"}"#,
        r#"{"type":"joinroom","roomid":"jokes"}"#,
    ] {
        c.send(line).await;
        let reason = c.expect_error().await;
        assert!(reason.contains("newidentity"), "{reason}");
    }
    // The session is kept: it can still identify.
    c.send(r#"{"type":"newidentity","identity":"Late"}"#).await;
    c.expect(r#"{"type":"newidentity","approved":"true"}"#)
        .await;
    c.expect(&room_change("Late", "", HALL)).await;
    // A second newidentity is an error, not a new identity.
    c.send(r#"{"type":"newidentity","identity":"Other"}"#).await;
    c.expect_error().await;
    c.expect_nothing_more().await;
    node.stop().await;
}

//! The endpoint's message layer with injected time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use super::{Endpoint, Event, Timing};

fn peer() -> SocketAddr {
    "127.0.0.1:5000".parse().unwrap()
}

fn packet(kind: MessageType, code: MessageClass, mid: u16, token: &[u8]) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.code = code;
    p.header.message_id = mid;
    p.set_token(token.to_vec());
    p
}

fn register(mid: u16) -> Vec<u8> {
    let mut p = packet(
        MessageType::Confirmable,
        MessageClass::Request(RequestType::Post),
        mid,
        b"t1",
    );
    p.add_option(CoapOption::UriPath, b"rd".to_vec());
    p.add_option(CoapOption::UriQuery, b"ep=imei1".to_vec());
    p.to_bytes().unwrap()
}

fn endpoint() -> Endpoint {
    Endpoint::new(Timing::default(), 42)
}

#[test]
fn confirmable_requests_are_retransmitted_with_back_off_then_given_up() {
    let mut e = endpoint();
    let mut get = Packet::new();
    get.header.code = MessageClass::Request(RequestType::Get);
    let (token, first) = e.request(peer(), get, 0);
    let mut sends = vec![0i64];
    let mut gave_up = None;
    for now in (0..=120_000).step_by(100) {
        let (events, out) = e.poll(now);
        for (_, bytes) in out {
            assert_eq!(bytes, first, "a retransmission is the same datagram");
            sends.push(now);
        }
        if let Some(Event::GaveUp { token: t, .. }) = events.into_iter().next() {
            assert_eq!(t, token);
            gave_up = Some(now);
            break;
        }
    }
    assert_eq!(
        sends.len(),
        5,
        "the first send and 4 retransmissions: {sends:?}"
    );
    let gaps: Vec<i64> = sends.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        (2_000..=3_100).contains(&gaps[0]),
        "first timeout in [2 s, 3 s]: {gaps:?}"
    );
    for pair in gaps.windows(2) {
        assert!(
            (pair[1] - 2 * pair[0]).abs() <= 200,
            "each wait doubles: {gaps:?}"
        );
    }
    let total = gave_up.unwrap();
    assert!(
        (45_000..=93_000).contains(&total),
        "gives up after MAX_TRANSMIT_WAIT: {total}"
    );
}

#[test]
fn acknowledgements_settle_requests() {
    let mut e = endpoint();
    let (token, bytes) = e.request(peer(), Packet::new(), 0);
    let mid = Packet::from_bytes(&bytes).unwrap().header.message_id;
    let ack = packet(
        MessageType::Acknowledgement,
        MessageClass::Response(ResponseType::Changed),
        mid,
        &token,
    );
    let (events, _) = e.handle(peer(), &ack.to_bytes().unwrap(), 10);
    assert!(
        matches!(&events[..], [Event::Response { packet, .. }] if packet.header.code == MessageClass::Response(ResponseType::Changed))
    );
    let (events, out) = e.poll(100_000);
    assert!(
        events.is_empty() && out.is_empty(),
        "nothing left to retransmit"
    );

    let (token, bytes) = e.request(peer(), Packet::new(), 0);
    let mid = Packet::from_bytes(&bytes).unwrap().header.message_id;
    let empty_ack = packet(MessageType::Acknowledgement, MessageClass::Empty, mid, &[]);
    let (events, _) = e.handle(peer(), &empty_ack.to_bytes().unwrap(), 10);
    assert!(matches!(&events[..], [Event::Delivered { token: t, .. }] if *t == token));

    let (token, bytes) = e.request(peer(), Packet::new(), 0);
    let mid = Packet::from_bytes(&bytes).unwrap().header.message_id;
    let reset = packet(MessageType::Reset, MessageClass::Empty, mid, &[]);
    let (events, _) = e.handle(peer(), &reset.to_bytes().unwrap(), 10);
    assert!(matches!(&events[..], [Event::Rejected { token: t, .. }] if *t == token));
    let (events, _) = e.handle(peer(), &reset.to_bytes().unwrap(), 11);
    assert!(
        events.is_empty(),
        "a late duplicate ACK/RST settles nothing"
    );
}

#[test]
fn duplicate_requests_get_the_same_answer_without_a_second_event() {
    let mut e = endpoint();
    let (events, out) = e.handle(peer(), &register(7), 0);
    assert!(matches!(&events[..], [Event::Request { .. }]));
    assert!(out.is_empty());
    let (events, out) = e.handle(peer(), &register(7), 500);
    assert!(
        events.is_empty() && out.is_empty(),
        "still being answered: nothing yet"
    );
    let request = Packet::from_bytes(&register(7)).unwrap();
    let mut created = Packet::new();
    created.header.code = MessageClass::Response(ResponseType::Created);
    let answer = e.reply(peer(), &request, created);
    let parsed = Packet::from_bytes(&answer).unwrap();
    assert_eq!(parsed.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(parsed.header.message_id, 7);
    assert_eq!(parsed.get_token(), b"t1");
    let (events, out) = e.handle(peer(), &register(7), 1_000);
    assert!(events.is_empty());
    assert_eq!(
        out,
        vec![(peer(), answer)],
        "the duplicate is answered again, identically"
    );
    // After the exchange lifetime the id is forgotten and counts as new.
    let _ = e.poll(300_000);
    let (events, _) = e.handle(peer(), &register(7), 300_001);
    assert!(matches!(&events[..], [Event::Request { .. }]));
    let other: SocketAddr = "127.0.0.1:5001".parse().unwrap();
    let (events, _) = e.handle(other, &register(7), 300_002);
    assert!(
        matches!(&events[..], [Event::Request { .. }]),
        "ids are per peer"
    );
}

#[test]
fn malformed_datagrams_are_reported_and_pings_reset() {
    let cases: &[(&str, Vec<u8>, bool)] = &[
        ("truncated header", vec![0x40], false),
        ("not CoAP (version 0)", b"hello world".to_vec(), false),
        (
            "token length 9 is reserved",
            vec![0x49, 0x01, 0x00, 0x05],
            true,
        ),
        (
            "option delta 15 is reserved",
            vec![0x40, 0x01, 0x00, 0x06, 0xF0],
            true,
        ),
    ];
    for (name, bytes, reset) in cases {
        let mut e = endpoint();
        let (events, out) = e.handle(peer(), bytes, 0);
        assert!(
            matches!(&events[..], [Event::Malformed { .. }]),
            "{name}: {events:?}"
        );
        assert_eq!(
            !out.is_empty(),
            *reset,
            "{name}: a readable CON header is reset"
        );
        if *reset {
            let rst = Packet::from_bytes(&out[0].1).unwrap();
            assert_eq!(rst.header.get_type(), MessageType::Reset, "{name}");
            assert_eq!(
                rst.header.message_id,
                u16::from_be_bytes([bytes[2], bytes[3]]),
                "{name}"
            );
        }
    }
    let mut e = endpoint();
    let ping = packet(MessageType::Confirmable, MessageClass::Empty, 9, &[]);
    let (events, out) = e.handle(peer(), &ping.to_bytes().unwrap(), 0);
    assert!(events.is_empty());
    assert_eq!(
        Packet::from_bytes(&out[0].1).unwrap().header.get_type(),
        MessageType::Reset
    );
}

#[test]
fn confirmable_notifications_wait_for_an_explicit_ack() {
    let mut e = endpoint();
    let mut notify = packet(
        MessageType::Confirmable,
        MessageClass::Response(ResponseType::Content),
        30,
        b"obs",
    );
    notify.payload = vec![1, 2, 3];
    let (events, out) = e.handle(peer(), &notify.to_bytes().unwrap(), 0);
    assert!(matches!(&events[..], [Event::Response { .. }]));
    assert!(out.is_empty(), "not acknowledged before the data is safe");
    let ack = e.acknowledge(peer(), &notify).unwrap();
    assert_eq!(
        Packet::from_bytes(&ack).unwrap().header.get_type(),
        MessageType::Acknowledgement
    );
    let (events, out) = e.handle(peer(), &notify.to_bytes().unwrap(), 10);
    assert!(
        events.is_empty(),
        "a retransmitted notification is not data again"
    );
    assert_eq!(out, vec![(peer(), ack)]);
}

#[test]
fn an_ack_whose_token_does_not_fit_still_settles_the_request() {
    let mut e = endpoint();
    let (token, bytes) = e.request(peer(), Packet::new(), 0);
    let mid = Packet::from_bytes(&bytes).unwrap().header.message_id;
    let odd = packet(
        MessageType::Acknowledgement,
        MessageClass::Response(ResponseType::Changed),
        mid,
        b"other",
    );
    let (events, _) = e.handle(peer(), &odd.to_bytes().unwrap(), 10);
    assert!(
        matches!(&events[..], [Event::Delivered { token: t, .. }] if *t == token),
        "{events:?}"
    );
    let (events, out) = e.poll(200_000);
    assert!(events.is_empty() && out.is_empty(), "nothing left waiting");
}

#[test]
fn a_forgotten_message_is_taken_again() {
    let mut e = endpoint();
    let (events, _) = e.handle(peer(), &register(40), 0);
    assert_eq!(events.len(), 1);
    e.forget(peer(), 40);
    let (events, _) = e.handle(peer(), &register(40), 10);
    assert_eq!(events.len(), 1, "the retransmission is new again");
}

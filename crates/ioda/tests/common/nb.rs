//! A scripted LwM2M client over real UDP (`NbDevice`), the way an NB-IoT module behaves: it
//! registers, answers the platform's observation, notifies data (also block-wise), and takes
//! (block-wise) writes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, ContentFormat, RequestType};
use ioda_coap::blockwise::Block;
use ioda_coap::{MessageClass, MessageType, Packet, ResponseType};
use tokio::net::UdpSocket;

/// A scripted LwM2M client, the way a HiSilicon NB-IoT module behaves.
pub struct NbDevice {
    pub socket: UdpSocket,
    pub server: SocketAddr,
    pub mid: u16,
    pub observe: Option<Vec<u8>>,
    pub seq: u32,
    pub stash: VecDeque<Packet>,
}

impl NbDevice {
    pub async fn new(server: SocketAddr) -> NbDevice {
        NbDevice {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            mid: 100,
            observe: None,
            seq: 1,
            stash: VecDeque::new(),
        }
    }

    pub async fn send(&self, packet: &Packet) {
        self.socket
            .send_to(&packet.to_bytes().unwrap(), self.server)
            .await
            .unwrap();
    }

    pub async fn recv(&mut self) -> Packet {
        if let Some(p) = self.stash.pop_front() {
            return p;
        }
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), self.socket.recv_from(&mut buf))
            .await
            .expect("a datagram from the server within 5 s")
            .unwrap();
        Packet::from_bytes(&buf[..n]).unwrap()
    }

    /// Nothing arrives for `ms`.
    pub async fn quiet(&mut self, ms: u64) {
        let mut buf = [0u8; 2048];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(ms), self.socket.recv_from(&mut buf)).await
        {
            panic!("unexpected {:?}", Packet::from_bytes(&buf[..n]));
        }
    }

    /// Sends a confirmable request and returns the server's piggybacked answer.
    pub async fn call(
        &mut self,
        code: RequestType,
        path: &[&str],
        query: &[&str],
        payload: &[u8],
    ) -> Packet {
        self.mid += 1;
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(code);
        p.header.message_id = self.mid;
        p.set_token(vec![0xAB, self.mid as u8]);
        for part in path {
            p.add_option(CoapOption::UriPath, part.as_bytes().to_vec());
        }
        for q in query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p.payload = payload.to_vec();
        self.send(&p).await;
        loop {
            let got = self.recv().await;
            if got.header.get_type() == MessageType::Acknowledgement
                && got.header.message_id == self.mid
            {
                return got;
            }
            self.stash.push_back(got);
        }
    }

    /// `call`, asserting the answer's code.
    pub async fn call_expecting(
        &mut self,
        code: ResponseType,
        method: RequestType,
        path: &[&str],
        query: &[&str],
        payload: &[u8],
    ) -> Packet {
        let answer = self.call(method, path, query, payload).await;
        assert_eq!(
            answer.header.code,
            MessageClass::Response(code),
            "{path:?} {query:?}"
        );
        answer
    }

    pub async fn register(&mut self, ep: &str, lifetime: u32, binding: &str) -> Packet {
        let (ep, lt, b) = (
            format!("ep={ep}"),
            format!("lt={lifetime}"),
            format!("b={binding}"),
        );
        self.call(
            RequestType::Post,
            &["rd"],
            &[&ep, &lt, &b, "lwm2m=1.0"],
            b"</>;rt=\"oma.lwm2m\",</1/0>,</3/0>,</19/0>,</19/1>",
        )
        .await
    }

    /// Answers the platform's `GET /19/0/0 Observe=0` and keeps its token.
    pub async fn accept_observe(&mut self) {
        let get = self.recv().await;
        assert_eq!(get.header.code, MessageClass::Request(RequestType::Get));
        assert_eq!(path_of(&get), "19/0/0");
        assert_eq!(get.get_observe_value().map(|v| v.unwrap()), Some(0));
        self.observe = Some(get.get_token().to_vec());
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Response(ResponseType::Content);
        ack.header.message_id = get.header.message_id;
        ack.set_token(get.get_token().to_vec());
        ack.set_observe_value(self.seq);
        self.send(&ack).await;
    }

    /// Data on the observation (NON 2.05, as modules send it).
    pub async fn notify(&mut self, payload: &[u8]) {
        self.mid += 1;
        self.seq += 1;
        let mut p = Packet::new();
        p.header.set_type(MessageType::NonConfirmable);
        p.header.code = MessageClass::Response(ResponseType::Content);
        p.header.message_id = self.mid;
        p.set_token(self.observe.clone().expect("observed"));
        p.set_observe_value(self.seq);
        p.set_content_format(ContentFormat::ApplicationOctetStream);
        p.payload = payload.to_vec();
        self.send(&p).await;
    }

    /// Waits for a `PUT /19/1/0` and returns it (unacknowledged).
    pub async fn next_write(&mut self) -> Packet {
        let put = self.recv().await;
        assert_eq!(
            put.header.code,
            MessageClass::Request(RequestType::Put),
            "{put:?}"
        );
        assert_eq!(put.header.get_type(), MessageType::Confirmable);
        assert_eq!(path_of(&put), "19/1/0");
        put
    }

    /// Takes a block-wise `PUT /19/1/0` (Block1), answering 2.31 Continue to all but the last
    /// block, and returns the reassembled payload.
    pub async fn receive_blockwise_write(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let put = self.next_write().await;
            let block = Block::of(&put, CoapOption::Block1).expect("a Block1 option");
            assert_eq!(
                block.num as usize * block.size(),
                body.len(),
                "blocks in order"
            );
            body.extend_from_slice(&put.payload);
            let mut ack = Packet::new();
            ack.header.set_type(MessageType::Acknowledgement);
            ack.header.code = MessageClass::Response(if block.more {
                ResponseType::Continue
            } else {
                ResponseType::Changed
            });
            ack.header.message_id = put.header.message_id;
            ack.set_token(put.get_token().to_vec());
            block.set(&mut ack, CoapOption::Block1);
            self.send(&ack).await;
            if !block.more {
                return body;
            }
        }
    }

    /// Reports `payload` block-wise: the first block as a notification with Block2, the rest
    /// served to the platform's GETs.
    pub async fn notify_blockwise(&mut self, payload: &[u8]) {
        let blocks = ioda_coap::blockwise::split(payload, 6);
        self.mid += 1;
        self.seq += 1;
        let mut first = Packet::new();
        first.header.set_type(MessageType::NonConfirmable);
        first.header.code = MessageClass::Response(ResponseType::Content);
        first.header.message_id = self.mid;
        first.set_token(self.observe.clone().expect("observed"));
        first.set_observe_value(self.seq);
        blocks[0].0.set(&mut first, CoapOption::Block2);
        first.payload = blocks[0].1.to_vec();
        self.send(&first).await;
        for (block, part) in &blocks[1..] {
            let get = self.recv().await;
            assert_eq!(
                get.header.code,
                MessageClass::Request(RequestType::Get),
                "{get:?}"
            );
            assert_eq!(path_of(&get), "19/0/0");
            assert_eq!(
                Block::of(&get, CoapOption::Block2).map(|b| b.num),
                Some(block.num)
            );
            let mut answer = Packet::new();
            answer.header.set_type(MessageType::Acknowledgement);
            answer.header.code = MessageClass::Response(ResponseType::Content);
            answer.header.message_id = get.header.message_id;
            answer.set_token(get.get_token().to_vec());
            block.set(&mut answer, CoapOption::Block2);
            answer.payload = part.to_vec();
            self.send(&answer).await;
        }
    }

    pub async fn ack_write(&self, put: &Packet) {
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Response(ResponseType::Changed);
        ack.header.message_id = put.header.message_id;
        ack.set_token(put.get_token().to_vec());
        self.send(&ack).await;
    }
}

pub fn path_of(p: &Packet) -> String {
    ioda_coap::lwm2m::path(p).join("/")
}

//! A tiny authoritative DNS server on 127.0.0.1 (UDP) for DNS discovery tests: SRV records
//! with their targets' A records in the additional section, and A records, with TTLs the
//! test sets and changes.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

#[derive(Default)]
struct Zone {
    /// name → (target, port) of SRV records, and their TTL.
    srv: HashMap<String, (Vec<(String, u16)>, u32)>,
    /// name → addresses, and their TTL.
    a: HashMap<String, (Vec<Ipv4Addr>, u32)>,
}

/// A DNS server answering from records the test sets.
pub struct FakeDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(name: &str) -> String {
    let n = name.to_ascii_lowercase();
    if n.ends_with('.') {
        n
    } else {
        format!("{n}.")
    }
}

impl FakeDns {
    /// Starts answering on a free UDP port of 127.0.0.1.
    pub async fn start() -> std::io::Result<FakeDns> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let queries: Arc<AtomicUsize> = Arc::default();
        let task = tokio::spawn(serve(socket, zone.clone(), queries.clone()));
        Ok(FakeDns {
            addr,
            zone,
            queries,
            task,
        })
    }

    /// Where it listens (UDP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the SRV records of `name` (empty: the name stops existing).
    pub fn set_srv(&self, name: &str, targets: &[(&str, u16)], ttl: u32) {
        let mut z = self.zone.lock().unwrap_or_else(|e| e.into_inner());
        if targets.is_empty() {
            z.srv.remove(&key(name));
        } else {
            let t = targets.iter().map(|(t, p)| (key(t), *p)).collect();
            z.srv.insert(key(name), (t, ttl));
        }
    }

    /// Sets the A records of `name` (empty: the name stops existing).
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        let mut z = self.zone.lock().unwrap_or_else(|e| e.into_inner());
        if ips.is_empty() {
            z.a.remove(&key(name));
        } else {
            z.a.insert(key(name), (ips.to_vec(), ttl));
        }
    }

    /// Queries answered so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

fn answer(zone: &Zone, request: &Message) -> Message {
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    let mut found = false;
    for q in &request.queries {
        response.add_query(q.clone());
        let name = q.name().clone();
        let k = key(&name.to_utf8());
        let a_records = |target: &str, name: &Name| -> Vec<Record> {
            zone.a
                .get(target)
                .map(|(ips, ttl)| {
                    ips.iter()
                        .map(|ip| Record::from_rdata(name.clone(), *ttl, RData::A(A(*ip))))
                        .collect()
                })
                .unwrap_or_default()
        };
        match q.query_type() {
            RecordType::SRV => {
                if let Some((targets, ttl)) = zone.srv.get(&k) {
                    found = true;
                    for (t, port) in targets {
                        let target = Name::from_ascii(t).expect("valid target name");
                        response.add_answer(Record::from_rdata(
                            name.clone(),
                            *ttl,
                            RData::SRV(SRV::new(0, 10, *port, target.clone())),
                        ));
                        for r in a_records(t, &target) {
                            response.add_additional(r);
                        }
                    }
                }
            }
            RecordType::A => {
                let records = a_records(&k, &name);
                found |= !records.is_empty();
                for r in records {
                    response.add_answer(r);
                }
            }
            // AAAA and others: the name may exist, with no records of that type.
            _ => found |= zone.a.contains_key(&k),
        }
    }
    if !found {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    response
}

async fn serve(socket: UdpSocket, zone: Arc<Mutex<Zone>>, queries: Arc<AtomicUsize>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(request) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        queries.fetch_add(1, Ordering::Relaxed);
        let response = {
            let z = zone.lock().unwrap_or_else(|e| e.into_inner());
            answer(&z, &request)
        };
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

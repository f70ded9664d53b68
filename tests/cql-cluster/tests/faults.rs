//! The test cluster's fault injection: a frozen node (SIGSTOP), a hung node (reads, never
//! answers) and a node that stops accepting, each undone by `thaw`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sluice_cql_testcluster::{ClusterSpec, TestCluster};

/// A v4 OPTIONS request on stream 1.
const OPTIONS: [u8; 9] = [0x04, 0x00, 0x00, 0x01, 0x05, 0, 0, 0, 0];
/// The SUPPORTED opcode.
const SUPPORTED: u8 = 0x06;

fn connect(c: &TestCluster, i: usize) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&c.address(i), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_millis(400)))?;
    Ok(s)
}

/// Sends OPTIONS; true if SUPPORTED comes back before the read timeout.
fn answers(s: &mut TcpStream) -> bool {
    s.write_all(&OPTIONS).unwrap();
    let mut head = [0u8; 9];
    if s.read_exact(&mut head).is_err() {
        return false;
    }
    let mut body = vec![0u8; u32::from_be_bytes([head[5], head[6], head[7], head[8]]) as usize];
    s.read_exact(&mut body).is_ok() && head[4] == SUPPORTED && head[0] == 0x84
}

/// Reads the answers a thawed node sends to what waited (one SUPPORTED each).
fn drain(s: &mut TcpStream, n: usize) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..n {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes([head[5], head[6], head[7], head[8]]) as usize];
        s.read_exact(&mut body).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
}

#[test]
fn frozen_hung_and_closed_nodes_answer_nothing_until_thawed() {
    let c = TestCluster::start(ClusterSpec::new(2, 4)).unwrap();
    let mut old = connect(&c, 1).unwrap();
    assert!(answers(&mut old));

    // Frozen: connections are accepted, nothing is answered; thawed, what waited is answered.
    c.freeze(1);
    assert!(!answers(&mut old));
    let mut new = connect(&c, 1).expect("a frozen node's port still accepts");
    assert!(!answers(&mut new));
    c.thaw(1);
    drain(&mut old, 1);
    assert!(answers(&mut old));

    // Hung: requests are read and dropped, even on new connections.
    c.hang(1);
    assert!(!answers(&mut old));
    let mut new = connect(&c, 1).unwrap();
    assert!(!answers(&mut new));
    c.thaw(1);
    let mut fresh = connect(&c, 1).unwrap();
    assert!(answers(&mut fresh));

    // Not accepting: new connections are refused, established ones are silent.
    c.stop_accepting(1);
    assert!(!answers(&mut fresh));
    assert!(connect(&c, 1).is_err(), "the port is closed");
    assert!(
        answers(&mut connect(&c, 0).unwrap()),
        "the other node is untouched"
    );
    c.thaw(1);
    assert!(answers(&mut connect(&c, 1).expect("the port opens again")));
}

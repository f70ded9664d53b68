//! The test cluster agrees with the recordings of a real Cassandra 4.0 cluster
//! (`../shared/fixtures/cql`): same ring and replicas, same system tables, and the same answers
//! to the requests of the recorded driver sessions when they are replayed against it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::Value as Json;
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::{split_frame, Header, Opcode};
use sluice_cql::request::{Extensions, Query, QueryParams};
use sluice_cql::response::{ResultBody, Rows};
use sluice_cql::{Compression, Request, Response};
use sluice_cql_testcluster::{ClusterSpec, NodeSpec, TestCluster};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/cql")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn ring_json() -> Json {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("ring.json")).unwrap()).unwrap()
}

fn parse_uuid(s: &str) -> [u8; 16] {
    let b = unhex(&s.replace('-', ""));
    b.try_into().expect("16 bytes")
}

/// The recorded cluster: same addresses, tokens, host ids, data center and rack.
fn recorded_spec() -> ClusterSpec {
    let ring = ring_json();
    let mut spec = ClusterSpec::new(3, 1);
    spec.cluster_name = ring["cluster_name"].as_str().unwrap().into();
    spec.nodes = ring["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| NodeSpec {
            address: n["address"].as_str().unwrap().parse().unwrap(),
            datacenter: n["data_center"].as_str().unwrap().into(),
            rack: n["rack"].as_str().unwrap().into(),
            tokens: n["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_i64().unwrap())
                .collect(),
            host_id: parse_uuid(n["host_id"].as_str().unwrap()),
        })
        .collect();
    spec
}

/// A blocking client speaking raw frames.
struct Client {
    stream: TcpStream,
    dec: Decoder,
    enc: Encoder,
    buf: BytesMut,
}

impl Client {
    fn connect(addr: std::net::SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            stream,
            dec: Decoder::default(),
            enc: Encoder::new(),
            buf: BytesMut::new(),
        }
    }

    fn send(&mut self, env: &Envelope) {
        let mut out = BytesMut::new();
        self.enc.encode(env, &mut out);
        self.stream.write_all(&out).unwrap();
    }

    fn set_framing(&mut self, f: Framing) {
        self.enc.set_framing(f);
        self.dec.set_framing(f);
    }

    /// The next response that is not an event.
    fn recv(&mut self) -> Envelope {
        loop {
            if let Some(env) = self.dec.decode(&mut self.buf).expect("response decodes") {
                if env.header.stream == -1 {
                    continue;
                }
                return env;
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn handshake(&mut self, version: u8, compression: Compression) {
        let mut opts = vec![("CQL_VERSION".to_string(), "3.4.5".to_string())];
        if let Some(c) = compression.name() {
            opts.push(("COMPRESSION".into(), c.into()));
        }
        let body = Request::Startup(opts).to_body(version);
        self.send(&Envelope::new(Header::request(version, 0, Opcode::Startup), body));
        if version < 5 {
            self.dec.set_framing(Framing::Frames(compression));
        }
        let r = self.recv();
        assert_eq!(r.header.opcode, Opcode::Ready as u8);
        self.set_framing(Framing::after_startup(version, compression));
    }

    fn query(&mut self, version: u8, q: &str) -> Response {
        let req = Request::Query(Query {
            query: q.into(),
            params: QueryParams::new(1),
        });
        self.send(&Envelope::new(
            Header::request(version, 1, Opcode::Query),
            req.to_body(version),
        ));
        let env = self.recv();
        let (_, body) = Extensions::split(&env.header, env.body).unwrap();
        Response::decode(version, env.header.opcode, body).unwrap()
    }
}

fn rows_of(r: Response) -> Rows {
    match r {
        Response::Result(ResultBody::Rows(rows)) => rows,
        other => panic!("expected rows, got {other:?}"),
    }
}

#[test]
fn replicas_match_the_recorded_ring() {
    let ring = ring_json();
    let cluster = TestCluster::start(recorded_spec()).unwrap();
    let mut checked = 0;
    for ks in ring["keyspaces"].as_array().unwrap() {
        let name = ks["name"].as_str().unwrap();
        let repl: Vec<String> = ks["replication"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("'{k}': '{}'", v.as_str().unwrap()))
            .collect();
        cluster
            .execute(&format!(
                "CREATE KEYSPACE {name} WITH replication = {{{}}}",
                repl.join(", ")
            ))
            .unwrap();
        cluster
            .execute(&format!("CREATE TABLE {name}.kv (k text PRIMARY KEY, v int)"))
            .unwrap();
        // Write every key through node 2 and read what the coordinator recorded.
        let mut c = Client::connect(cluster.address(1));
        c.handshake(4, Compression::None);
        cluster.clear_records();
        for key in ks["keys"].as_array().unwrap() {
            let k = key["key"].as_str().unwrap().replace('\'', "''");
            c.query(4, &format!("INSERT INTO {name}.kv (k, v) VALUES ('{k}', 1)"));
        }
        let records = cluster.records();
        for (key, rec) in ks["keys"].as_array().unwrap().iter().zip(&records) {
            assert_eq!(rec.token, key["token"].as_i64(), "{name} {}", key["key"]);
            let want: Vec<IpAddr> = key["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().parse().unwrap())
                .collect();
            let got: Vec<IpAddr> = rec.replicas.iter().map(|&i| cluster.address(i).ip()).collect();
            assert_eq!(got, want, "{name} {}", key["key"]);
            assert_eq!(
                rec.coordinator_is_replica(),
                Some(want.contains(&cluster.address(1).ip()))
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 312);
}

#[test]
fn system_tables_match_the_recorded_nodes() {
    let ring = ring_json();
    let cluster = TestCluster::start(recorded_spec()).unwrap();
    for (i, addr) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
        let want = &ring["system_tables_by_node"][addr];
        let mut c = Client::connect(cluster.address(i));
        c.handshake(5, Compression::None);
        for table in ["system.local", "system.peers", "system.peers_v2"] {
            let rows = rows_of(c.query(5, &format!("SELECT * FROM {table}")));
            let names: Vec<&str> = rows.metadata.columns.iter().map(|c| c.name.as_str()).collect();
            let want_rows = want[table].as_array().unwrap();
            let mut want_names: Vec<&str> = want_rows[0]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let mut got_names = names.clone();
            want_names.sort();
            got_names.sort();
            assert_eq!(got_names, want_names, "{addr} {table}");
            let got_rows = rows.rows().unwrap();
            assert_eq!(got_rows.len(), want_rows.len(), "{addr} {table}");
            for (got, want) in got_rows.iter().zip(want_rows) {
                for col in [
                    "host_id",
                    "data_center",
                    "rack",
                    "peer",
                    "rpc_address",
                    "release_version",
                    "cluster_name",
                ] {
                    let Some(pos) = names.iter().position(|n| *n == col) else {
                        continue;
                    };
                    let v = got[pos].as_ref().expect("value");
                    let text = match col {
                        "host_id" => {
                            let h: String = v.iter().map(|b| format!("{b:02x}")).collect();
                            format!(
                                "{}-{}-{}-{}-{}",
                                &h[..8],
                                &h[8..12],
                                &h[12..16],
                                &h[16..20],
                                &h[20..]
                            )
                        }
                        "peer" | "rpc_address" => format!("{}.{}.{}.{}", v[0], v[1], v[2], v[3]),
                        _ => String::from_utf8(v.to_vec()).unwrap(),
                    };
                    assert_eq!(text, want[col].as_str().unwrap(), "{addr} {table} {col}");
                }
            }
        }
    }
}

fn jsonl(name: &str) -> Vec<Json> {
    let text = std::fs::read_to_string(fixtures().join("captures").join(name)).expect(name);
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn decode_envelope(hex: &str, compression: Compression) -> Envelope {
    let mut buf = BytesMut::from(&unhex(hex)[..]);
    let f = split_frame(&mut buf, 1 << 28).unwrap().unwrap();
    let body = if f.header.flags & 1 != 0 {
        Bytes::from(compression.decompress(&f.body, 1 << 28).unwrap())
    } else {
        f.body
    };
    Envelope::new(f.header, body)
}

fn response_of(env: &Envelope) -> Response {
    let (_, body) = Extensions::split(&env.header, env.body.clone()).unwrap();
    Response::decode(env.header.version, env.header.opcode, body).unwrap()
}

/// Compares our answer with Cassandra's; returns a description of any difference.
fn compare(step: &str, want: &Response, got: &Response) -> Option<String> {
    let diff = |what: &str| Some(format!("{step}: {what}: want {want:?}\n got {got:?}"));
    match (want, got) {
        (Response::Error(a), Response::Error(b)) => (a.code != b.code).then(|| diff("error code")).flatten(),
        (Response::Result(a), Response::Result(b)) => match (a, b) {
            (ResultBody::Void, ResultBody::Void) => None,
            (ResultBody::SetKeyspace(a), ResultBody::SetKeyspace(b)) => {
                (a != b).then(|| diff("keyspace")).flatten()
            }
            (ResultBody::SchemaChange(a), ResultBody::SchemaChange(b)) => {
                (a != b).then(|| diff("schema change")).flatten()
            }
            (ResultBody::Prepared(a), ResultBody::Prepared(b)) => {
                if a.id != b.id {
                    return diff("prepared id");
                }
                if a.result_metadata_id != b.result_metadata_id {
                    return diff("result metadata id");
                }
                if a.metadata != b.metadata {
                    return diff("bind metadata");
                }
                (a.result_metadata != b.result_metadata)
                    .then(|| diff("result metadata"))
                    .flatten()
            }
            (ResultBody::Rows(a), ResultBody::Rows(b)) => {
                let cols = |r: &Rows| {
                    r.metadata
                        .columns
                        .iter()
                        .map(|c| (c.name.clone(), c.typ.clone()))
                        .collect::<Vec<_>>()
                };
                if cols(a) != cols(b) {
                    return diff("columns");
                }
                let user = a
                    .metadata
                    .columns
                    .first()
                    .is_some_and(|c| c.keyspace == "proxy_fixture");
                if user && a.rows().unwrap() != b.rows().unwrap() {
                    return diff("rows");
                }
                if user && a.metadata.paging_state.is_some() != b.metadata.paging_state.is_some() {
                    return diff("has more pages");
                }
                None
            }
            _ => diff("result kind"),
        },
        (a, b) if a.opcode() == b.opcode() => None,
        _ => diff("opcode"),
    }
}

/// Replays the requests of the recorded driver connection (conn 2) and compares every answer.
fn replay(name: &str, records_file: &str, version: u8, compression: Compression) {
    let cluster = TestCluster::start(recorded_spec()).unwrap();
    let records: Vec<Json> = jsonl(records_file)
        .into_iter()
        .filter(|r| r["conn"] == 2)
        .collect();
    let mut c = Client::connect(cluster.address(0));
    // Paging states are the server's own: substitute ours for Cassandra's.
    let mut our_paging: HashMap<Vec<u8>, Bytes> = HashMap::new();
    let mut diffs = Vec::new();
    let mut compared = 0;
    for (i, rec) in records.iter().enumerate() {
        if rec["dir"] != "c2s" {
            continue;
        }
        let step = rec["step"].as_str().unwrap();
        let env = decode_envelope(rec["hex"].as_str().unwrap(), compression);
        let stream = env.header.stream;
        let want = records[i + 1..]
            .iter()
            .find(|r| r["dir"] == "s2c" && r["stream"].as_i64() == Some(i64::from(stream)))
            .map(|r| decode_envelope(r["hex"].as_str().unwrap(), compression))
            .expect("a recorded answer");
        if env.header.opcode == Opcode::Startup as u8 {
            c.send(&env);
            if version < 5 {
                c.dec.set_framing(Framing::Frames(compression));
            }
            let got = c.recv();
            assert_eq!(got.header.opcode, want.header.opcode);
            c.set_framing(Framing::after_startup(version, compression));
            continue;
        }
        let (ext, body) = Extensions::split(&env.header, env.body.clone()).unwrap();
        let mut req = Request::decode(version, env.header.opcode, body).unwrap();
        let key = match &req {
            Request::Query(q) => q.query.as_bytes().to_vec(),
            Request::Execute(e) => e.id.to_vec(),
            _ => Vec::new(),
        };
        match &mut req {
            Request::Query(Query { params, .. })
            | Request::Execute(sluice_cql::request::Execute { params, .. })
                if params.paging_state.is_some() =>
            {
                params.paging_state = our_paging.get(&key).cloned();
            }
            _ => {}
        }
        let mut out = BytesMut::new();
        ext.encode(&mut out);
        req.encode(version, &mut out);
        c.send(&Envelope::new(env.header, out.freeze()));
        let got = c.recv();
        assert_eq!(got.header.stream, stream);
        let (want_r, got_r) = (response_of(&want), response_of(&got));
        if let Response::Result(ResultBody::Rows(r)) = &got_r {
            if let Some(p) = &r.metadata.paging_state {
                our_paging.insert(key, p.clone());
            }
        }
        let flags_want = want.header.flags & 0x0a;
        let flags_got = got.header.flags & 0x0a;
        if flags_want != flags_got {
            diffs.push(format!("{step}: header flags {flags_want:#x} vs {flags_got:#x}"));
        }
        if let Some(d) = compare(step, &want_r, &got_r) {
            diffs.push(d);
        }
        compared += 1;
    }
    assert!(compared > 60, "{name}: only {compared} requests compared");
    assert!(
        diffs.is_empty(),
        "{name}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
fn replaying_the_v4_session_gives_cassandras_answers() {
    replay("v4", "capture_v4.frames.jsonl", 4, Compression::None);
}

#[test]
fn replaying_the_v4_lz4_session_gives_cassandras_answers() {
    replay("v4 lz4", "capture_v4_lz4.frames.jsonl", 4, Compression::Lz4);
}

#[test]
fn replaying_the_v5_session_gives_cassandras_answers() {
    replay("v5", "capture_v5.envelopes.jsonl", 5, Compression::None);
}

#[test]
fn replaying_the_v5_lz4_session_gives_cassandras_answers() {
    replay("v5 lz4", "capture_v5_lz4.envelopes.jsonl", 5, Compression::Lz4);
}

#[test]
fn unsupported_versions_get_a_protocol_error_in_a_readable_header() {
    let cluster = TestCluster::start(ClusterSpec::new(1, 4)).unwrap();
    for (probe, header_len, version_byte) in [
        (vec![0x02u8, 0, 0, 5, 0, 0, 0, 0], 8, 0x82u8),
        (vec![0x03, 0, 0, 0, 5, 0, 0, 0, 0], 9, 0x83),
        (vec![0x07, 0, 0, 0, 5, 0, 0, 0, 0], 9, 0x85),
    ] {
        let mut s = TcpStream::connect(cluster.address(0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&probe).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert_eq!(out[0], version_byte, "{out:?}");
        let body = &out[header_len..];
        assert_eq!(&body[..4], &[0, 0, 0, 0x0a]);
        let msg = String::from_utf8_lossy(&body[6..]);
        assert!(msg.contains("Invalid or unsupported protocol version"), "{msg}");
    }
}

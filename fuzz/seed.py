#!/usr/bin/env python3
"""Writes seed corpora for the fuzz targets into fuzz/corpus/<target>/ (gitignored).

  python3 fuzz/seed.py [--fixtures ../shared/fixtures]

postgres_codec:    startup packets and message sequences built here (as libpq/tokio-postgres send them)
postgres_classify: the SQL strings of the classifier's table tests
config:            config/sluice.toml, the embedded default and the TOML in the config unit tests
cql_codec:         the recorded CQL v4/v5 sessions in <fixtures>/cql/captures (streams, frames, segments)
"""

import argparse
import hashlib
import json
import os
import re
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def rust_strings(text):
    """The contents of the ordinary "..." string literals in Rust source, unescaped."""
    out = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', text):
        s = m.group(1)
        s = re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}.get(e.group(1), e.group(1)), s)
        out.append(s)
    return out


# --- PostgreSQL ---------------------------------------------------------------------------

def msg(tag, body=b""):
    return tag + struct.pack("!i", len(body) + 4) + body


def cstr(s):
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def startup(params, minor=0):
    body = struct.pack("!hh", 3, minor) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSS_REQUEST = struct.pack("!ii", 8, 80877104)


def postgres_codec():
    login = startup([("user", "app"), ("database", "app"), ("application_name", "fuzz")])
    scram_first = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
    sasl = msg(b"p", cstr("SCRAM-SHA-256") + struct.pack("!i", len(scram_first)) + scram_first)
    sasl_final = msg(b"p", b"c=biws,r=rOprNGfwEbeRWgbNEkqOfuzzservernonce0123456789,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    query = msg(b"Q", cstr("SELECT 1"))
    parse = msg(b"P", cstr("s1") + cstr("SELECT $1::int") + struct.pack("!hi", 1, 23))
    bind = msg(b"B", cstr("") + cstr("s1") + struct.pack("!hh", 1, 0) + struct.pack("!hi", 1, 1) + b"7" + struct.pack("!h", 0))
    describe = msg(b"D", b"S" + cstr("s1"))
    execute = msg(b"E", cstr("") + struct.pack("!i", 0))
    sync = msg(b"S")
    close = msg(b"C", b"S" + cstr("s1"))
    flush = msg(b"H")
    copy = msg(b"d", b"1\t2\n") + msg(b"c")
    copy_fail = msg(b"f", cstr("no"))
    terminate = msg(b"X")
    cancel = struct.pack("!iiii", 16, 80877102, 1234, 5678)
    seeds = [
        login,
        SSL_REQUEST + login,
        GSS_REQUEST + SSL_REQUEST + login,
        cancel,
        startup([("user", "app"), ("replication", "true")]),
        startup([("user", "app"), ("options", "-c search_path=x")], minor=2),
        login + sasl + sasl_final + query + terminate,
        login + sasl + sasl_final + parse + bind + describe + execute + sync,
        parse + bind + execute + parse + bind + execute + sync + close + sync + flush,
        query + copy + copy_fail + terminate,
        msg(b"Q", cstr("BEGIN; INSERT INTO t VALUES (1); COMMIT")),
        msg(b"Z", b"I") + msg(b"E", b"SERROR\0C25006\0Mcannot execute INSERT in a read-only transaction\0\0"),
        msg(b"N", b"SWARNING\0C01000\0Mwarn\0\0"),
    ]
    for s in seeds:
        write("postgres_codec", s)


def postgres_classify():
    path = os.path.join(ROOT, "protocols", "postgres", "src", "classify", "tests.rs")
    with open(path) as f:
        strings = rust_strings(f.read())
    n = 0
    for s in strings:
        if len(s) >= 3:
            write("postgres_classify", s)
            n += 1
    return n


# --- config --------------------------------------------------------------------------------

def config():
    with open(os.path.join(ROOT, "config", "sluice.toml")) as f:
        write("config", f.read())
    n = 1
    for dirpath, _, files in os.walk(os.path.join(ROOT, "src", "config")):
        for name in files:
            with open(os.path.join(dirpath, name)) as f:
                text = f.read()
            for m in re.finditer(r'r#"(.*?)"#', text, re.S):
                if "[" in m.group(1) and "=" in m.group(1):
                    write("config", m.group(1))
                    n += 1
    return n


# --- CQL -----------------------------------------------------------------------------------

MODE_LZ4, MODE_SNAPPY, MODE_SEGMENTS, MODE_SEGMENTS_LZ4, MODE_HANDSHAKE = 1, 2, 4, 8, 16
MAX_STREAM_SEED = 64 * 1024


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cql(fixtures):
    caps = os.path.join(fixtures, "cql", "captures")
    if not os.path.isdir(caps):
        print(f"no CQL captures in {caps}; cql_codec gets no seeds", file=sys.stderr)
        return 0
    n = 0
    for meta_name in sorted(os.listdir(caps)):
        if not meta_name.endswith(".meta.json"):
            continue
        name = meta_name[: -len(".meta.json")]
        with open(os.path.join(caps, meta_name)) as f:
            meta = json.load(f)
        version = meta.get("protocol_version") or 4
        lz4 = meta.get("compression") == "lz4"
        if version >= 5:
            stream_mode = MODE_HANDSHAKE | (MODE_SEGMENTS_LZ4 if lz4 else 0)
        else:
            stream_mode = MODE_LZ4 if lz4 else 0
        # Whole streams per (connection, direction), cut to a seed-sized prefix.
        streams = {}
        for c in jsonl(os.path.join(caps, name + ".chunks.jsonl")):
            streams.setdefault((c["conn"], c["dir"]), []).append(bytes.fromhex(c["hex"]))
        for chunks in streams.values():
            data = b""
            for c in chunks:
                if data and len(data) + len(c) > MAX_STREAM_SEED:
                    break
                data += c
            for chunk_size in (0, 7):
                write("cql_codec", bytes([stream_mode, chunk_size]) + data)
                n += 1
        # Single frames and segments.
        for kind in ("frames", "segments"):
            path = os.path.join(caps, f"{name}.{kind}.jsonl")
            if not os.path.exists(path):
                continue
            for rec in jsonl(path):
                raw = bytes.fromhex(rec["hex"])
                if len(raw) > MAX_STREAM_SEED:
                    continue
                if rec.get("kind") == "segment":
                    mode = MODE_SEGMENTS | (MODE_SEGMENTS_LZ4 if lz4 else 0)
                else:
                    mode = MODE_LZ4 if lz4 else 0
                write("cql_codec", bytes([mode, 0]) + raw)
                n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(ROOT), "shared", "fixtures"))
    args = ap.parse_args()
    postgres_codec()
    counts = {
        "postgres_classify": postgres_classify(),
        "config": config(),
        "cql_codec": cql(args.fixtures),
    }
    for target in sorted(os.listdir(CORPUS)):
        print(f"{target}: {len(os.listdir(os.path.join(CORPUS, target)))} seeds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

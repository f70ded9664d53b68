//! What an idle client costs, by type: the session's task future and the state it keeps.
//! `cargo test --lib session::sizes -- --nocapture` prints them (benches/README.md, "Small
//! idle clients and a leaner relay", has the breakdown); the test fails if the task future
//! grows past a bound.

use std::future::Future;
use std::mem::size_of;

use super::in_flight::InFlight;
use super::*;

fn output_size1<A, F: FnOnce(A) -> Fut, Fut: Future>(_: F) -> usize {
    size_of::<Fut>()
}

fn output_size2<A, B, F: FnOnce(A, B) -> Fut, Fut: Future>(_: F) -> usize {
    size_of::<Fut>()
}

fn output_size3<A, B, C, F: FnOnce(A, B, C) -> Fut, Fut: Future>(_: F) -> usize {
    size_of::<Fut>()
}

#[test]
fn an_idle_session_is_small() {
    let task = output_size3(serve);
    let login = output_size3(admit_and_log_in);
    let sizes = [
        ("serve (the connection's task future)", task),
        ("  admit_and_log_in (boxed while it runs)", login),
        ("  Session::run", output_size1(Session::run)),
        ("    Session::relay", output_size1(Session::relay)),
        ("      Session::next_event", output_size1(Session::next_event)),
        ("      Session::flush_client", output_size1(Session::flush_client)),
        (
            "      Session::process_client_messages",
            output_size1(Session::process_client_messages),
        ),
        (
            "        Session::handle_client_message",
            output_size2(Session::handle_client_message),
        ),
        (
            "        Session::attach_counted (slow path boxed)",
            output_size2(Session::attach_counted),
        ),
        (
            "        Session::start_transaction (wait boxed)",
            output_size1(Session::start_transaction),
        ),
        ("    Session::detach_at_end", output_size1(Session::detach_at_end)),
        ("Session (boxed)", size_of::<Session>()),
        ("  Link", size_of::<Link>()),
        ("  ClientStream", size_of::<ClientStream>()),
        ("  Buffer", size_of::<Buffer>()),
        ("  Settings", size_of::<Settings>()),
        ("  statements", size_of::<statements::Statements>()),
        ("  Rare (boxed when first needed)", size_of::<Rare>()),
        (
            "  Option<Busy>",
            size_of::<Option<crate::postgres::activity::Busy>>(),
        ),
        ("InFlight (per attached backend, recycled)", size_of::<InFlight>()),
        ("Checkout", size_of::<Checkout>()),
        (
            "ClientInfo (Arc: console list, cancel keys)",
            size_of::<crate::postgres::activity::ClientInfo>(),
        ),
        (
            "  CancelState",
            size_of::<crate::postgres::cluster::CancelState>(),
        ),
    ];
    for (what, size) in sizes {
        println!("{what:<60} {size:>6} B");
    }
    // Every idle client's task holds this future: keep it small. Tokio allocates it with the
    // task's header (96 B) in 128-byte steps: up to 160 B the task takes 256 B, one byte more
    // and it takes 384 B. The bound is on the debug build's size, which is not the release
    // build's: at 160 B in debug the release task took 384 B (heaptrack; +100 B per idle
    // client), at 152 B it takes 256 B. So the bound is 152: a future that grows fails here,
    // and its release size is to be checked with heaptrack (benches/README.md) before the
    // bound moves. It was 1,656 B on main before the first bound (6f1dbbb), then
    // 408 B (512 B task) until `serve` was chained with combinators and `run`, `relay`,
    // `flush_client`, `process_client_messages` and `node_down` became functions returning
    // `async move` blocks (an async fn keeps its arguments twice); 256 B since the wait of a
    // request in flight is woken by its pool's drain instead of holding a topology watch;
    // 152 B since a parked backend's reclaim is a registered waker on the connection instead
    // of a `Notify` waiter in the future and `handle_client_message` is awaited once.
    assert!(task <= 152, "the session task future grew to {task} B");
    // Freed once the client is in, but every login in flight holds it, and logins in flight
    // next to long-lived allocations leave holes in the heap when they end: 8,256 B until the
    // rare branches (auth_query's lookup, a database's first function catalog load) were
    // boxed and the login timeout stopped storing the handshake twice; 2,720 B since.
    assert!(login <= 3 * 1024, "the boxed login future grew to {login} B");
    // The two other allocations of every idle client, bounded where glibc's chunk size steps
    // (a request of n bytes takes a chunk of n + 8 rounded up to 16): the session box at
    // 216 B takes 224 (it was 240 B, a 256-byte chunk, while it kept its cancel key, its
    // function catalog and a second pointer to its cluster); the client record at 120 B, an
    // `Arc` of 136 B, takes 144 (216 B and 240 before: full-width addresses and times, three
    // pointers for its names, a `Notify` for cancels).
    let session = size_of::<Session>();
    assert!(session <= 216, "the session grew to {session} B");
    let info = size_of::<crate::postgres::activity::ClientInfo>();
    assert!(info <= 120, "the client record grew to {info} B");
}

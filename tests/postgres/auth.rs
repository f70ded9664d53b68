//! Client authentication to sluice, and sluice's authentication to backends (SCRAM, md5,
//! trust).

use tokio_postgres::error::SqlState;

use crate::support::{bounded, connect, simple_column, try_connect};
use crate::Env;

const MORE_USERS: &str = r#"
[[clusters.users]]
name = "legacy"
password = "legacy-secret"

[[clusters.users]]
name = "postgres"
password = "pw"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_with_28p01() {
    let env = Env::start_with(1, "", MORE_USERS);
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        for (user, password) in [("app", "wrong"), ("nobody", "app-secret"), ("legacy", "")] {
            let Err(err) = try_connect(addr, user, password, "app").await else {
                panic!("{user}/{password:?} was let in");
            };
            assert_eq!(
                err.code(),
                Some(&SqlState::INVALID_PASSWORD),
                "{user}/{password:?}: {err:?}"
            );
        }
        // Failed logins do not disturb good ones.
        let client = env.app_client().await;
        assert_eq!(simple_column(&client, "SELECT current_user").await, ["app"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_trust_backends_work() {
    let env = Env::start_with(1, "", MORE_USERS);
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        // legacy: the backends ask sluice for md5.
        let legacy = connect(addr, "legacy", "legacy-secret", "app").await;
        assert_eq!(simple_column(&legacy, "SELECT current_user").await, ["legacy"]);
        let row = legacy
            .query_one("SELECT current_user::text, pg_is_in_recovery()", &[])
            .await
            .expect("extended read as legacy");
        assert_eq!(row.get::<_, String>(0), "legacy");
        assert_eq!(
            simple_column(
                &legacy,
                "CREATE TABLE l (x int); INSERT INTO l VALUES (7); SELECT 1"
            )
            .await,
            ["1"]
        );

        // postgres: the backends trust it; clients still authenticate to sluice.
        let su = connect(addr, "postgres", "pw", "app").await;
        assert_eq!(simple_column(&su, "SELECT current_user").await, ["postgres"]);
        assert_eq!(simple_column(&su, "SELECT x FROM l FOR UPDATE").await, ["7"]);
        let Err(err) = try_connect(addr, "postgres", "not-pw", "app").await else {
            panic!("a trusted backend user still needs sluice's password");
        };
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

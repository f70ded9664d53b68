//! The admin console's CQL views: `SHOW RING` and `SHOW NODES` for a CQL cluster, read through
//! the console of a PostgreSQL listener of the same sluice.

use std::time::{Duration, Instant};

use sluice_cql_testcluster::{ClusterSpec, TestCluster};
use tokio_postgres::SimpleQueryMessage;

use crate::support::{bounded, free_port, Sluice};

async fn rows(client: &tokio_postgres::Client, command: &str) -> Vec<Vec<String>> {
    client
        .simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_ring_lists_each_node_with_its_token_ownership() {
    let cluster = TestCluster::start(ClusterSpec::new(3, 8)).expect("test cluster starts");
    let pg_listen = free_port();
    // The PostgreSQL cluster only carries the console; its node need not exist.
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\nadmin_users = [\"ops\"]\n\n\
         [[clusters]]\nname = \"ring\"\nprotocol = \"cql\"\nlisten = \"127.0.0.1:{}\"\nprobe_interval = \"200ms\"\n\n\
         [clusters.discovery]\nstatic = {}\n\n\
         [[clusters]]\nname = \"pg\"\nprotocol = \"postgres\"\nlisten = \"127.0.0.1:{pg_listen}\"\n\n\
         [clusters.discovery]\nstatic = [\"127.0.0.1:1\"]\n\n\
         [[clusters.users]]\nname = \"ops\"\npassword = \"ops-secret\"\n",
        free_port(),
        free_port(),
        cluster.contact_points_toml()
    );
    let sluice = Sluice::spawn_with_env(&toml, &[]);
    bounded(60, async {
        let addr = format!("127.0.0.1:{pg_listen}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let console = loop {
            match crate::support::try_connect(addr, "ops", "ops-secret", "sluice").await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "console never answered: {e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let ring = loop {
            let ring = rows(&console, "SHOW RING").await;
            if ring.len() == 3 && ring.iter().all(|r| r[5] == "8") {
                break ring;
            }
            assert!(Instant::now() < deadline, "ring not read: {ring:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let total: f64 = ring
            .iter()
            .map(|r| r[6].trim_end_matches('%').parse::<f64>().unwrap())
            .sum();
        assert!(
            (total - 100.0).abs() < 0.1,
            "ownership adds up to {total}: {ring:?}"
        );
        assert!(ring.iter().all(|r| r[0] == "ring" && r[4] == "yes"), "{ring:?}");
        let nodes = rows(&console, "SHOW NODES").await;
        let cql: Vec<_> = nodes.iter().filter(|r| r[0] == "ring").collect();
        assert_eq!(cql.len(), 3, "{nodes:?}");
        assert!(
            cql.iter().all(|r| r[3] == "ring-member" && r[4] == "yes"),
            "{nodes:?}"
        );
        let pg: Vec<_> = nodes.iter().filter(|r| r[0] == "pg").collect();
        assert_eq!(pg.len(), 1, "{nodes:?}");
        assert_eq!(pg[0][4], "no", "the dead PostgreSQL node: {nodes:?}");

        // The status page draws the same ownership as bars, one per ring node.
        let (status, page) = sluice.http_get("/");
        assert_eq!(status, 200);
        let bar =
            regex::Regex::new(r#"<tr class="ring-node" data-address="[^"]+">.*style="width:([0-9.]+)%""#)
                .unwrap();
        let widths: Vec<f64> = bar.captures_iter(&page).map(|c| c[1].parse().unwrap()).collect();
        assert_eq!(widths.len(), 3, "{page}");
        let drawn: f64 = widths.iter().sum();
        assert!((drawn - 100.0).abs() < 0.1, "bars add up to {drawn}%: {page}");
        assert!(page.contains(r#"data-cluster="ring""#) && page.contains(r#"data-cluster="pg""#));
    })
    .await;
    sluice.assert_no_unexpected_errors(&[]);
    drop(sluice);
    drop(cluster);
}

//! The admin listener: `/health/live` always answers 200; `/health/ready` answers 200
//! once the metadata group and every hosted partition have leaders, and 503 with the
//! reasons when a node has lost its majority.

use std::time::{Duration, Instant};

use keel_broker::config::local_cluster;
use keel_broker::node::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` from `addr`: the status code and the body.
async fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut resp)).await.unwrap().unwrap();
    let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

async fn wait_for(addr: &str, path: &str, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = get(addr, path).await;
        if code == want {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} on {addr} stayed {code}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_majority_and_live_always_answers() {
    let dir = tempfile::tempdir().unwrap();
    let configs = local_cluster(dir.path(), 3, "health-test");
    let admin_addrs: Vec<String> = configs[0].cluster.members.iter().map(|m| m.admin_addr.clone()).collect();
    let mut nodes = Node::start_all(configs).await.unwrap();
    for addr in &admin_addrs {
        assert_eq!(get(addr, "/health/live").await.0, 200);
        wait_for(addr, "/health/ready", 200).await;
    }
    // Two of three nodes stop: the survivor has no majority, so no metadata leader.
    let survivor = nodes.remove(0);
    for n in nodes {
        n.shutdown().await;
    }
    let body = wait_for(&admin_addrs[0], "/health/ready", 503).await;
    assert!(body.contains("metadata group has no leader"), "{body}");
    assert_eq!(get(&admin_addrs[0], "/health/live").await.0, 200, "still live");
    survivor.shutdown().await;
}

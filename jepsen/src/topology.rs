//! Where the nodes run: one network namespace per node, joined by veth pairs to a bridge
//! in a switch namespace, plus a client namespace on the same bridge for the harness
//! itself (`shared/notes/jepsen.md` §4; nothing is changed in the host namespace).
//!
//! Faults the network gives: a node's cable unplugged; frames between chosen nodes
//! dropped on the bridge (nftables, any direction, so one-way partitions too); random
//! loss on a node's input (nftables `numgen`); a bandwidth cap on a node's link (tc tbf).
//! Every name carries the run's prefix, and everything is removed when the `Topology`
//! drops (also on a panic). Needs root; [`Topology::probe`] tells whether it is there.

use std::process::Command;

/// The bridge-side subnet: node `i` is `10.77.0.i`, the harness `10.77.0.100`.
pub const SUBNET: &str = "10.77.0";
/// The harness' own address in the client namespace.
pub const CLIENT_HOST: u32 = 100;

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program} {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Namespaces, links and filters of one run.
pub struct Topology {
    prefix: String,
    nodes: u32,
    /// Whether the bridge filter table exists (created on the first partition).
    filtered: std::cell::Cell<bool>,
}

impl Topology {
    /// Whether namespaces can be made here (root, iproute2): `Err` says why not.
    pub fn probe(prefix: &str) -> Result<(), String> {
        let name = format!("{prefix}probe");
        ip(&["netns", "add", &name])?;
        ip(&["netns", "del", &name])
    }

    /// The switch namespace (the bridge `br0` and the node-side veth ends `vI`).
    pub fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// Node `i`'s namespace (1-based).
    pub fn ns(&self, node: u32) -> String {
        format!("{}n{node}", self.prefix)
    }

    /// The client namespace, where the harness' own sockets live.
    pub fn client_ns(&self) -> String {
        format!("{}c", self.prefix)
    }

    pub fn nodes(&self) -> u32 {
        self.nodes
    }

    /// Node `i`'s address.
    pub fn addr(node: u32) -> String {
        format!("{SUBNET}.{node}")
    }

    /// Creates the switch, `nodes` node namespaces and the client namespace. On error,
    /// what was created is removed.
    pub fn create(prefix: &str, nodes: u32) -> Result<Topology, String> {
        let t = Topology { prefix: prefix.to_string(), nodes, filtered: std::cell::Cell::new(false) };
        t.build().inspect_err(|_| t.remove())?;
        Ok(t)
    }

    fn attach(&self, ns: &str, veth: &str, host: u32) -> Result<(), String> {
        let sw = self.switch();
        ip(&["netns", "add", ns])?;
        ip(&["-n", &sw, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        ip(&["-n", &sw, "link", "set", veth, "master", "br0"])?;
        ip(&["-n", &sw, "link", "set", veth, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{SUBNET}.{host}/24"), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])
    }

    fn build(&self) -> Result<(), String> {
        let sw = self.switch();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 1..=self.nodes {
            self.attach(&self.ns(i), &format!("v{i}"), i)?;
        }
        self.attach(&self.client_ns(), "v0", CLIENT_HOST)
    }

    fn remove(&self) {
        for i in 1..=self.nodes {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["netns", "del", &self.client_ns()]);
        let _ = ip(&["netns", "del", &self.switch()]);
    }

    /// `program` to be run inside node `i`'s namespace.
    pub fn command(&self, node: u32, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(node)]).arg(program);
        c
    }

    /// Moves the calling thread into the client namespace; threads it creates afterwards
    /// inherit it. Call before any runtime or thread pool starts.
    pub fn enter_client_namespace(&self) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.client_ns());
        let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns(2) with a valid namespace descriptor; it changes only this
        // thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Plugs node `i`'s cable in or out.
    pub fn cable(&self, node: u32, up: bool) -> Result<(), String> {
        ip(&["-n", &self.switch(), "link", "set", &format!("v{node}"), if up { "up" } else { "down" }])
    }

    fn nft(&self, ns: &str, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["netns", "exec", ns, "nft"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Drops every frame from node `a` to node `b` on the bridge, for each `(a, b)`
    /// (give both directions for a two-way cut). Adds to what is already dropped.
    pub fn drop_between(&self, links: &[(u32, u32)]) -> Result<(), String> {
        let sw = self.switch();
        if !self.filtered.get() {
            self.nft(&sw, &["add", "table", "bridge", "jepsen"])?;
            self.nft(&sw, &["add", "chain", "bridge", "jepsen", "grudge", "{ type filter hook forward priority 0; policy accept; }"])?;
            self.filtered.set(true);
        }
        for (a, b) in links {
            self.nft(&sw, &["add", "rule", "bridge", "jepsen", "grudge", "iifname", &format!("v{a}"), "oifname", &format!("v{b}"), "drop"])?;
        }
        Ok(())
    }

    /// Removes every bridge drop rule.
    pub fn heal(&self) -> Result<(), String> {
        if self.filtered.get() {
            self.nft(&self.switch(), &["flush", "table", "bridge", "jepsen"])?;
        }
        Ok(())
    }

    /// Drops `percent` of the packets node `i` receives (0 removes the rule).
    pub fn loss(&self, node: u32, percent: u32) -> Result<(), String> {
        let ns = self.ns(node);
        let _ = self.nft(&ns, &["delete", "table", "inet", "jepsen"]);
        if percent == 0 {
            return Ok(());
        }
        self.nft(&ns, &["add", "table", "inet", "jepsen"])?;
        self.nft(&ns, &["add", "chain", "inet", "jepsen", "input", "{ type filter hook input priority 0; policy accept; }"])?;
        self.nft(&ns, &["add", "rule", "inet", "jepsen", "input", "numgen", "random", "mod", "100", "<", &percent.to_string(), "drop"])
    }

    /// Caps node `i`'s outgoing bandwidth (`None` removes the cap).
    pub fn bandwidth(&self, node: u32, kbit: Option<u32>) -> Result<(), String> {
        let ns = self.ns(node);
        let _ = run("ip", &["netns", "exec", &ns, "tc", "qdisc", "del", "dev", "eth0", "root"]);
        match kbit {
            None => Ok(()),
            Some(k) => run(
                "ip",
                &["netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", &format!("{k}kbit"), "burst", "32kb", "latency", "400ms"],
            ),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.remove();
    }
}

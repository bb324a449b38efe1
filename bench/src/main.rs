//! switchboard's load generator. Everything runs on loopback: it starts its
//! own `redis-server` and nodes, every loop is bounded in count and time,
//! and it prints a summary plus one JSON line.
//!
//! - `assign`: nearest-driver lookup and full dispatch latency with N drivers
//!   in the Redis GEO set, over HTTP to one node process (`GET
//!   /api/drivers/nearby`, `POST /api/orders` with a pickup point), next to
//!   the `GET /healthz` round trip on the same connection (the HTTP floor).
//! - `locations`: D driver sockets stream positions to one node process,
//!   an admin socket watches; ingest rate and staleness at the watcher.
//! - `expiry`: offers due in the same second across K node processes;
//!   each expires once; lateness = `order_timeout` received − deadline.
//! - `fanout`: S subscribers over N nodes (via Redis), a publisher at rate R
//!   through `POST /api/publish`; deliveries/s, loss, duplicates, latency,
//!   server CPU per delivery and peak RSS, and the loadgen's own CPU cost;
//!   `--rooms K` spreads the publishes over K rooms, `--redis-cluster M`
//!   runs the nodes on a Redis Cluster of M masters (Redis CPU per master;
//!   `scripts/fanout-chart` draws the runs' JSON lines).
//! - `connections`: N idle sockets over K nodes; RSS per socket, idle CPU.
//! - `churn`: connect + authenticate + first message, per second.
//! - `recovery`: S sockets over the three dialects and K nodes, publishers
//!   numbering events, a fault (a node SIGKILLed, or a rolling restart);
//!   sockets resume with `since` elsewhere; every acknowledged event must
//!   arrive exactly once, in order per room (SPEC §10).
//! - `redispatch`: W orders wait (`no_drivers`); one driver per order comes
//!   online next to it and reports its position; latency from the position
//!   sent to `new_order` at that driver (SPEC §5 "No stranded order").
//! - `flood`: one node, S subscribers on a steady publish stream, and in
//!   alternating phases one abusive socket sending 10,000 messages/s; the
//!   subscribers' delivery p99 with and without it (SPEC §11).
//! - `soak`: two nodes for 30 minutes (bounded): fan-out, driver locations,
//!   connection churn, dispatch, one Redis restart and one node SIGKILL;
//!   RSS and open fds of each node over time, lost and duplicated events.
//!
//! One module per scenario; `shared` holds what they have in common. Nodes
//! are processes of the workspace's `switchboard` binary, found beside this
//! one (`cargo build --release --workspace --bins` builds both).

mod assign;
mod churn;
mod connections;
mod expiry;
mod fanout;
mod flood;
mod locations;
mod recovery;
mod redispatch;
mod shared;
mod soak;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", about = "switchboard load generator (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dispatch latency with many drivers in the GEO set.
    Assign {
        #[arg(long, default_value_t = 100_000)]
        drivers: usize,
        #[arg(long, default_value_t = 2000)]
        orders: usize,
        /// Side of the square the drivers are spread over, km.
        #[arg(long, default_value_t = 50.0)]
        area_km: f64,
        /// Database (default: a temp SQLite file).
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Driver positions into one node, an admin watching.
    Locations {
        #[arg(long, default_value_t = 500)]
        drivers: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Positions per second per driver (0 = as fast as the socket takes them).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Fan-out through Redis: S subscribers over N nodes, publishes at R/s.
    Fanout(fanout::Args),
    /// History and recovery under a fault: lost, duplicated, out of order.
    Recovery(recovery::Args),
    /// Waiting orders: a driver becomes eligible → `new_order` latency.
    Redispatch(redispatch::Args),
    /// One abusive socket (10,000 messages/s) vs the other sockets' p99.
    Flood(flood::Args),
    /// Two nodes for a long time under everything at once, with faults:
    /// RSS, fds, lost and duplicated events.
    Soak(soak::Args),
    /// Idle sockets: RSS and CPU per socket.
    Connections {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        /// Seconds to hold them idle while measuring CPU.
        #[arg(long, default_value_t = 20.0)]
        idle_secs: f64,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Connect + authenticate + first message, per second.
    Churn {
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Internal: hold `count` idle sockets to `addr` (used by `connections`).
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        first_ip: u8,
        #[arg(long)]
        secs: f64,
    },
    /// Offers due together across nodes.
    Expiry {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 300)]
        offers: usize,
        #[arg(long, default_value_t = 3.0)]
        timeout_secs: f64,
        #[arg(long)]
        database_url: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Assign {
                drivers,
                orders,
                area_km,
                database_url,
            } => assign::run(drivers, orders, area_km, database_url).await,
            Cmd::Locations {
                drivers,
                secs,
                rate,
                database_url,
            } => locations::run(drivers, secs, rate, database_url).await,
            Cmd::Expiry {
                nodes,
                offers,
                timeout_secs,
                database_url,
            } => expiry::run(nodes, offers, timeout_secs, database_url).await,
            Cmd::Fanout(args) => fanout::run(args).await,
            Cmd::Recovery(args) => recovery::run(args).await,
            Cmd::Redispatch(args) => redispatch::run(args).await,
            Cmd::Flood(args) => flood::run(args).await,
            Cmd::Soak(args) => soak::run(args).await,
            Cmd::Connections {
                nodes,
                sockets,
                idle_secs,
                database_url,
            } => connections::run(nodes, sockets, idle_secs, database_url).await,
            Cmd::Churn {
                concurrency,
                secs,
                database_url,
            } => churn::run(concurrency, secs, database_url).await,
            Cmd::Hold {
                addr,
                count,
                first_ip,
                secs,
            } => connections::hold(addr, count, first_ip, secs).await,
        }
    })
}

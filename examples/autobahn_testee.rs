//! The Autobahn TestSuite's echo testee (see `src/ws/testee.rs`):
//! `autobahn_testee [ADDR]` (default 127.0.0.1:9001), messages up to 16 MiB.

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()
        .expect("ADDR is host:port");
    eprintln!("autobahn testee on ws://{addr}");
    switchboard::ws::testee::run(addr, 16 * 1024 * 1024).await
}

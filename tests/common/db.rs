//! Test databases: a SQLite file in a temp dir or a fresh PostgreSQL
//! database ([`TestDb`]), [`db_variants!`](crate::db_variants) to run a test
//! on both, and raw queries for assertions.

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

/// A database shared by the nodes of one test cluster: a SQLite file in a
/// temp dir, or a fresh PostgreSQL database (dropped on drop).
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("sb.db").display());
        TestDb {
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// A new database on the server of `TEST_DATABASE_URL`; `None` when the
    /// variable is unset (PostgreSQL variants are then skipped, loudly).
    pub async fn postgres() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var("TEST_DATABASE_URL") else {
            eprintln!("TEST_DATABASE_URL unset: skipping the PostgreSQL variant");
            return None;
        };
        use sea_orm::ConnectionTrait;
        let name = format!("sb_test_{:016x}", rand::random::<u64>());
        let admin = sea_orm::Database::connect(&admin_url)
            .await
            .expect("TEST_DATABASE_URL reachable");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        admin.close().await.ok();
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&admin_url);
        Some(TestDb {
            url: format!("{base}/{name}"),
            _dir: None,
            pg: Some((admin_url, name)),
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = self.pg.take() {
            // Drop runs outside async: a short-lived runtime on its own thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sea_orm::ConnectionTrait;
                    if let Ok(db) = sea_orm::Database::connect(&admin_url).await {
                        let _ = db
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs a test body once on SQLite and once on PostgreSQL (when
/// `TEST_DATABASE_URL` is set): `db_variants!(name, body_fn);` where
/// `body_fn(TestDb)` is an async fn.
#[macro_export]
macro_rules! db_variants {
    ($name:ident, $body:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::common::init_tracing();
                $body($crate::common::TestDb::sqlite()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::common::init_tracing();
                if let Some(db) = $crate::common::TestDb::postgres().await {
                    $body(db).await;
                }
            }
        }
    };
}

/// A direct connection to the test database, for assertions.
pub async fn db_conn(db: &TestDb) -> DatabaseConnection {
    Database::connect(&db.url).await.expect("test db reachable")
}

/// One integer from a raw query (`SELECT count(*) …`).
pub async fn scalar(conn: &DatabaseConnection, sql: &str) -> i64 {
    let backend: DbBackend = conn.get_database_backend();
    let row = conn
        .query_one_raw(Statement::from_string(backend, sql.to_string()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("one row");
    row.try_get_by_index::<i64>(0)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One text value from a raw query.
pub async fn text(conn: &DatabaseConnection, sql: &str) -> Option<String> {
    let backend: DbBackend = conn.get_database_backend();
    conn.query_one_raw(Statement::from_string(backend, sql.to_string()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .map(|row| {
            row.try_get_by_index::<String>(0)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
}

/// Status of the one offer of `order_id` (panics unless there is exactly one).
pub async fn only_offer(conn: &DatabaseConnection, order_id: i64) -> (i64, String) {
    let n = scalar(
        conn,
        &format!("SELECT count(*) FROM offers WHERE order_id = {order_id}"),
    )
    .await;
    assert_eq!(n, 1, "offers of order {order_id}");
    let id = scalar(
        conn,
        &format!("SELECT id FROM offers WHERE order_id = {order_id}"),
    )
    .await;
    let status = text(
        conn,
        &format!("SELECT status FROM offers WHERE order_id = {order_id}"),
    )
    .await
    .unwrap();
    (id, status)
}

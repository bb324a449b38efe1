//! `DriverIndex`: where drivers are, which are online, which are near a
//! point, and which orders wait near a point for a driver. Two
//! implementations pass one contract ([`contract`] in the tests below):
//! [`redis::RedisIndex`] (one Redis or a Redis Cluster) and
//! [`memory::MemoryIndex`] (embedded mode).
//!
//! Redis: a GEO set `drivers:geo`, a last-seen sorted set `drivers:seen`
//! (score = unix ms), a set of drivers who said they are unavailable,
//! `drivers:off`, each driver's city `drivers:city` (hash), presence as two
//! sorted sets of expiry times (`drivers:sock`, refreshed by the nodes
//! holding the driver's sockets, and `drivers:http`, by the driver HTTP
//! API), and the orders waiting for a driver as a GEO set
//! `orders:waiting`. `nearest` runs one Lua script (one round trip):
//! GEOSEARCH, then drop stale, unavailable and offline drivers. Positions
//! are written in batches by one task per node: one multi-member `GEOADD` +
//! `ZADD` per round trip, however many sockets report, with one script in
//! the same round trip that finds the waiting orders near each reporting
//! driver (nothing at all when none wait).
//!
//! Cities (SPEC §12): every operation whose keys depend on it takes the
//! city (the order's `city_id` for an order, the driver token's city for a
//! driver, 0 for none). On a Redis Cluster each city is a partition of its
//! own (hash tag `{cN}`: `sb:{c1}:drivers:geo`, …) and a search stays in
//! the [`Scope`] it is given; on one Redis and in memory there is one index
//! for all cities and the city is not used (a search looks across cities).
//! Memory: maps behind mutexes, scanned linearly.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

pub use crate::event::haversine_km;
use crate::redis_conn::RedisError;
pub use memory::MemoryIndex;
pub use redis::RedisIndex;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("driver index: {0}")]
    Redis(#[from] RedisError),
    #[error("driver index: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nearby {
    pub driver_id: i64,
    pub distance_km: f64,
    pub latitude: f64,
    pub longitude: f64,
    /// The city of the driver's token when it last reported a position.
    pub city_id: Option<i64>,
}

/// The city a driver or an order belongs to in the index; 0 when none
/// (a driver token without a city).
pub fn city_of(city_id: Option<i64>) -> i64 {
    city_id.unwrap_or(0)
}

/// Where a nearest-driver search looks. On a Redis Cluster: one city's
/// partition, some cities' (a manager's), or every registered city's (an
/// admin's). One Redis and the memory index hold one index for all cities
/// and search it whole whatever the scope (callers filter by city when
/// they must).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    City(i64),
    Cities(&'a [i64]),
    All,
}

/// How a driver shows it is online (SPEC §5 "Presence").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A driver socket is open on some node; that node refreshes it.
    Socket,
    /// The driver called the driver HTTP API.
    Http,
}

/// A position report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub driver_id: i64,
    pub city_id: Option<i64>,
    pub lat: f64,
    pub lon: f64,
    /// How far to look for waiting orders around the driver.
    pub radius_km: f64,
}

pub trait DriverIndex: Send + Sync + 'static {
    /// Records a position; the driver is "seen" now. Returns the orders
    /// waiting for a driver within `radius_km` of it, nearest first (at
    /// most [`WAITING_NEAR`]).
    fn put(&self, report: Report) -> impl Future<Output = Result<Vec<i64>, IndexError>> + Send;
    fn set_available(
        &self,
        city: i64,
        driver_id: i64,
        available: bool,
    ) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// Drivers within `radius_km` that are available and were seen within
    /// `fresh`, nearest first, at most `limit`.
    fn nearest(
        &self,
        scope: Scope<'_>,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Nearby>, IndexError>> + Send;
    fn position(
        &self,
        city: i64,
        driver_id: i64,
    ) -> impl Future<Output = Result<Option<(f64, f64)>, IndexError>> + Send;
    /// The driver's position in `city` or, on an index partitioned by
    /// city, in any other city it reported in (an admin's assignment of a
    /// driver of another city). Unpartitioned: [`DriverIndex::position`].
    fn locate(
        &self,
        city: i64,
        driver_id: i64,
    ) -> impl Future<Output = Result<Option<(f64, f64)>, IndexError>> + Send {
        self.position(city, driver_id)
    }
    /// The drivers are online `via` for `ttl` from now (never shortening a
    /// longer presence of the same kind). Returns those that were offline
    /// before (by either kind): they just came online.
    fn online(
        &self,
        city: i64,
        driver_ids: &[i64],
        via: Via,
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<i64>, IndexError>> + Send;
    /// The driver's last socket on this node closed: its socket presence
    /// ends now (HTTP presence, if any, runs on). Another node holding a
    /// socket of the same driver restores it at its next refresh.
    fn offline(
        &self,
        city: i64,
        driver_id: i64,
    ) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// The order waits for a driver at its pickup point.
    fn wait_order(
        &self,
        city: i64,
        order_id: i64,
        lat: f64,
        lon: f64,
    ) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// The order no longer waits (offered, assigned, gone or given up).
    fn unwait_order(
        &self,
        city: i64,
        order_id: i64,
    ) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// Orders waiting within `radius_km` of a point, nearest first, at most
    /// [`WAITING_NEAR`].
    fn waiting_near(
        &self,
        city: i64,
        lat: f64,
        lon: f64,
        radius_km: f64,
    ) -> impl Future<Output = Result<Vec<i64>, IndexError>> + Send;
}

/// How many waiting orders a driver who becomes eligible is checked
/// against (nearest first).
pub const WAITING_NEAR: usize = 8;

/// The index a node runs with, chosen by `REDIS_URL`.
pub enum AnyIndex {
    Memory(MemoryIndex),
    Redis(RedisIndex),
}

impl DriverIndex for AnyIndex {
    async fn put(&self, report: Report) -> Result<Vec<i64>, IndexError> {
        match self {
            AnyIndex::Memory(i) => i.put(report).await,
            AnyIndex::Redis(i) => i.put(report).await,
        }
    }
    async fn set_available(
        &self,
        city: i64,
        driver_id: i64,
        available: bool,
    ) -> Result<(), IndexError> {
        match self {
            AnyIndex::Memory(i) => i.set_available(city, driver_id, available).await,
            AnyIndex::Redis(i) => i.set_available(city, driver_id, available).await,
        }
    }
    async fn nearest(
        &self,
        scope: Scope<'_>,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> Result<Vec<Nearby>, IndexError> {
        match self {
            AnyIndex::Memory(i) => i.nearest(scope, lat, lon, radius_km, fresh, limit).await,
            AnyIndex::Redis(i) => i.nearest(scope, lat, lon, radius_km, fresh, limit).await,
        }
    }
    async fn position(&self, city: i64, driver_id: i64) -> Result<Option<(f64, f64)>, IndexError> {
        match self {
            AnyIndex::Memory(i) => i.position(city, driver_id).await,
            AnyIndex::Redis(i) => i.position(city, driver_id).await,
        }
    }
    async fn locate(&self, city: i64, driver_id: i64) -> Result<Option<(f64, f64)>, IndexError> {
        match self {
            AnyIndex::Memory(i) => i.locate(city, driver_id).await,
            AnyIndex::Redis(i) => i.locate(city, driver_id).await,
        }
    }
    async fn online(
        &self,
        city: i64,
        ids: &[i64],
        via: Via,
        ttl: Duration,
    ) -> Result<Vec<i64>, IndexError> {
        match self {
            AnyIndex::Memory(i) => i.online(city, ids, via, ttl).await,
            AnyIndex::Redis(i) => i.online(city, ids, via, ttl).await,
        }
    }
    async fn offline(&self, city: i64, driver_id: i64) -> Result<(), IndexError> {
        match self {
            AnyIndex::Memory(i) => i.offline(city, driver_id).await,
            AnyIndex::Redis(i) => i.offline(city, driver_id).await,
        }
    }
    async fn wait_order(
        &self,
        city: i64,
        order_id: i64,
        lat: f64,
        lon: f64,
    ) -> Result<(), IndexError> {
        match self {
            AnyIndex::Memory(i) => i.wait_order(city, order_id, lat, lon).await,
            AnyIndex::Redis(i) => i.wait_order(city, order_id, lat, lon).await,
        }
    }
    async fn unwait_order(&self, city: i64, order_id: i64) -> Result<(), IndexError> {
        match self {
            AnyIndex::Memory(i) => i.unwait_order(city, order_id).await,
            AnyIndex::Redis(i) => i.unwait_order(city, order_id).await,
        }
    }
    async fn waiting_near(
        &self,
        city: i64,
        lat: f64,
        lon: f64,
        radius_km: f64,
    ) -> Result<Vec<i64>, IndexError> {
        match self {
            AnyIndex::Memory(i) => i.waiting_near(city, lat, lon, radius_km).await,
            AnyIndex::Redis(i) => i.waiting_near(city, lat, lon, radius_km).await,
        }
    }
}

/// One contract, run against both implementations: the memory index and
/// the Redis one on a `redis-server` of the test's own.
#[cfg(test)]
mod contract {
    use super::*;

    #[test]
    fn haversine_matches_a_known_distance() {
        // Tashkent points from seed 001: about 1.29 km apart.
        let d = haversine_km(41.311081, 69.240562, 41.299496, 69.240074);
        assert!((d - 1.289).abs() < 0.01, "{d}");
    }

    fn ids(n: &[Nearby]) -> Vec<i64> {
        n.iter().map(|n| n.driver_id).collect()
    }

    fn at(city: i64, driver_id: i64, lat: f64, lon: f64) -> Report {
        Report {
            driver_id,
            city_id: Some(city),
            lat,
            lon,
            radius_km: 10.0,
        }
    }

    async fn nearest_filters_and_sorts(i: &impl DriverIndex, c: i64) {
        let fresh = Duration::from_secs(60);
        let hour = Duration::from_secs(3600);
        assert_eq!(
            i.online(c, &[1, 2, 3, 4], Via::Http, hour).await.unwrap(),
            vec![1, 2, 3, 4],
            "all four come online"
        );
        i.put(at(c, 1, 41.30, 69.24)).await.unwrap();
        i.put(at(c, 2, 41.31, 69.24)).await.unwrap();
        i.put(at(c, 3, 45.0, 69.24)).await.unwrap();
        i.set_available(c, 2, false).await.unwrap();
        let n = i
            .nearest(Scope::City(c), 41.30, 69.24, 10.0, fresh, 10)
            .await
            .unwrap();
        assert_eq!(ids(&n), vec![1], "unavailable and far drivers are skipped");
        assert_eq!(n[0].city_id, Some(c), "the city comes back");
        i.set_available(c, 2, true).await.unwrap();
        let n = i
            .nearest(Scope::City(c), 41.309, 69.24, 10.0, fresh, 10)
            .await
            .unwrap();
        assert_eq!(ids(&n), vec![2, 1], "nearest first");
        assert!((n[0].distance_km - 0.111).abs() < 0.01, "{n:?}");
        assert_eq!(
            ids(&i
                .nearest(Scope::City(c), 41.309, 69.24, 10.0, fresh, 1)
                .await
                .unwrap()),
            vec![2]
        );
        // A driver unknown to the index that says "unavailable" stays out
        // once it reports a position.
        i.set_available(c, 4, false).await.unwrap();
        i.put(at(c, 4, 41.30, 69.24)).await.unwrap();
        let n = i
            .nearest(Scope::City(c), 41.30, 69.24, 10.0, fresh, 10)
            .await
            .unwrap();
        assert!(!ids(&n).contains(&4), "{n:?}");
        let (lat, lon) = i.position(c, 1).await.unwrap().expect("a position");
        assert!((lat - 41.30).abs() < 1e-4 && (lon - 69.24).abs() < 1e-4);
        assert_eq!(i.position(c, 99).await.unwrap(), None);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = i
            .nearest(
                Scope::City(c),
                41.30,
                69.24,
                10.0,
                Duration::from_millis(1),
                10,
            )
            .await
            .unwrap();
        assert!(n.is_empty(), "stale drivers are skipped: {n:?}");
    }

    async fn near(i: &impl DriverIndex, c: i64) -> Vec<i64> {
        let fresh = Duration::from_secs(60);
        ids(&i
            .nearest(Scope::City(c), 42.0, 69.0, 10.0, fresh, 10)
            .await
            .unwrap())
    }

    async fn presence(i: &impl DriverIndex, c: i64) {
        i.put(at(c, 7, 42.0, 69.0)).await.unwrap();
        assert!(
            near(i, c).await.is_empty(),
            "a driver never online is not offered"
        );
        let ttl = Duration::from_secs(30);
        assert_eq!(i.online(c, &[7], Via::Socket, ttl).await.unwrap(), vec![7]);
        assert_eq!(
            i.online(c, &[7], Via::Socket, ttl).await.unwrap(),
            Vec::<i64>::new(),
            "a refresh is not a coming online"
        );
        assert_eq!(
            i.online(c, &[7], Via::Http, ttl).await.unwrap(),
            Vec::<i64>::new()
        );
        assert_eq!(near(i, c).await, vec![7]);
        i.offline(c, 7).await.unwrap();
        assert_eq!(near(i, c).await, vec![7], "the HTTP presence runs on");
        // Socket only: closing it takes the driver offline at once.
        i.put(at(c, 8, 42.0, 69.0)).await.unwrap();
        assert_eq!(i.online(c, &[8], Via::Socket, ttl).await.unwrap(), vec![8]);
        assert_eq!(near(i, c).await, vec![7, 8]);
        i.offline(c, 8).await.unwrap();
        assert_eq!(near(i, c).await, vec![7]);
        // An expired presence: offline, and coming back counts as new.
        i.online(c, &[9], Via::Socket, Duration::from_millis(1))
            .await
            .unwrap();
        i.put(at(c, 9, 42.0, 69.0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(near(i, c).await, vec![7]);
        assert_eq!(i.online(c, &[9], Via::Socket, ttl).await.unwrap(), vec![9]);
    }

    async fn waiting_orders(i: &impl DriverIndex, c: i64) {
        assert!(
            i.put(at(c, 20, 41.30, 69.24)).await.unwrap().is_empty(),
            "no order waits"
        );
        i.wait_order(c, 100, 41.31, 69.24).await.unwrap();
        i.wait_order(c, 101, 41.30, 69.24).await.unwrap();
        i.wait_order(c, 102, 45.0, 69.24).await.unwrap();
        assert_eq!(
            i.put(at(c, 20, 41.30, 69.241)).await.unwrap(),
            vec![101, 100],
            "the waiting orders within the radius, nearest first"
        );
        assert_eq!(
            i.waiting_near(c, 41.312, 69.24, 10.0).await.unwrap(),
            vec![100, 101]
        );
        assert_eq!(
            i.waiting_near(c, 41.312, 69.24, 0.5).await.unwrap(),
            vec![100]
        );
        i.unwait_order(c, 100).await.unwrap();
        i.unwait_order(c, 100).await.unwrap();
        assert_eq!(
            i.waiting_near(c, 41.312, 69.24, 10.0).await.unwrap(),
            vec![101]
        );
    }

    async fn contract(i: &impl DriverIndex, c: i64) {
        nearest_filters_and_sorts(i, c).await;
        presence(i, c).await;
        waiting_orders(i, c).await;
    }

    /// Two drivers of cities 1 and 2 side by side, and an order of city 2
    /// waiting there. `partitioned` (a cluster): a search of one city finds
    /// only its drivers and orders, a search of all cities both; otherwise
    /// (one index for all cities) every search finds both.
    async fn cities(i: &impl DriverIndex, partitioned: bool) {
        let fresh = Duration::from_secs(60);
        let hour = Duration::from_secs(3600);
        i.online(1, &[50], Via::Http, hour).await.unwrap();
        i.online(2, &[51], Via::Http, hour).await.unwrap();
        i.put(at(1, 50, 50.0, 30.0)).await.unwrap();
        i.wait_order(2, 500, 50.0, 30.001).await.unwrap();
        i.put(at(2, 51, 50.0, 30.002)).await.unwrap();
        let found = |scope| async move {
            ids(&i.nearest(scope, 50.0, 30.0, 1.0, fresh, 10).await.unwrap())
        };
        let both = vec![50, 51];
        let (one, two) = if partitioned {
            (vec![50], vec![51])
        } else {
            (both.clone(), both.clone())
        };
        assert_eq!(found(Scope::City(1)).await, one, "city 1");
        assert_eq!(found(Scope::Cities(&[2])).await, two, "city 2");
        assert_eq!(found(Scope::Cities(&[1, 2])).await, both, "cities 1 and 2");
        assert_eq!(found(Scope::All).await, both, "every city");
        assert_eq!(found(Scope::All).await.len(), 2, "each driver once");
        let n = i
            .nearest(Scope::All, 50.0, 30.0, 1.0, fresh, 1)
            .await
            .unwrap();
        assert_eq!(
            ids(&n),
            vec![50],
            "the limit over all cities, nearest first"
        );
        let waits = i.put(at(1, 50, 50.0, 30.0)).await.unwrap();
        assert_eq!(waits, if partitioned { vec![] } else { vec![500] });
        assert_eq!(i.put(at(2, 51, 50.0, 30.0)).await.unwrap(), vec![500]);
        assert_eq!(
            i.waiting_near(1, 50.0, 30.0, 1.0).await.unwrap().is_empty(),
            partitioned
        );
        i.unwait_order(2, 500).await.unwrap();
        assert!(i.waiting_near(2, 50.0, 30.0, 1.0).await.unwrap().is_empty());
        assert!(i.position(2, 51).await.unwrap().is_some());
        assert_eq!(i.position(1, 51).await.unwrap().is_none(), partitioned);
        // Located from any city (the order's city comes first).
        // (GEO positions come back within a few cm.)
        let close = |p: Option<(f64, f64)>| {
            p.is_some_and(|(lat, lon)| (lat - 50.0).abs() < 1e-5 && (lon - 30.0).abs() < 1e-5)
        };
        assert!(close(i.locate(1, 51).await.unwrap()), "51 from city 1");
        assert!(close(i.locate(2, 50).await.unwrap()), "50 from city 2");
        assert_eq!(i.locate(1, 52).await.unwrap(), None, "never reported");
    }

    #[tokio::test]
    async fn memory_index() {
        let i = MemoryIndex::default();
        contract(&i, 1).await;
        cities(&i, false).await;
    }

    #[tokio::test]
    async fn redis_index() {
        let redis = switchboard_testkit::RedisServer::start();
        let pool = crate::redis_conn::Redis::open(&redis.url()).unwrap();
        let i = RedisIndex::new(pool, "sbtest:");
        contract(&i, 1).await;
        cities(&i, false).await;
    }

    /// Every script and the position writer's pipeline stay in one city's
    /// slot of a real 3-master cluster; cities 1 and 2 are on different
    /// masters (`{c1}` and `{c2}`), and each is a partition of its own: the
    /// whole contract passes in city 2 after city 1 as on a fresh index.
    #[tokio::test]
    async fn redis_cluster_index() {
        let cluster = switchboard_testkit::RedisCluster::start(3);
        let redis = crate::redis_conn::Redis::open(&cluster.url()).unwrap();
        assert_ne!(
            cluster.master_of("sbtest:{c1}:drivers:geo"),
            cluster.master_of("sbtest:{c2}:drivers:geo")
        );
        let i = RedisIndex::new(redis, "sbtest:");
        contract(&i, 1).await;
        contract(&i, 2).await;
        cities(&i, true).await;
    }
}

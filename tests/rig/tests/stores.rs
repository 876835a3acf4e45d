//! PostgreSQL and Redis: connect and round-trip.
#![cfg(feature = "brokers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowgate_rig_tests::{endpoint, unique};

#[tokio::test]
async fn postgres_round_trip() {
    let url = endpoint("FLOWGATE_TEST_POSTGRES_URL");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    let table = unique("rig").replace('-', "_");
    client
        .batch_execute(&format!(
            "create table {table} (id bigint primary key, body text not null)"
        ))
        .await
        .expect("create");
    for i in 0..100i64 {
        client
            .execute(
                &format!("insert into {table} values ($1, $2)"),
                &[&i, &format!("row-{i}")],
            )
            .await
            .expect("insert");
    }
    let row = client
        .query_one(&format!("select count(*), max(body) from {table}"), &[])
        .await
        .expect("select");
    assert_eq!(row.get::<_, i64>(0), 100);
    assert_eq!(row.get::<_, String>(1), "row-99");
    client
        .batch_execute(&format!("drop table {table}"))
        .await
        .expect("drop");
}

#[tokio::test]
async fn redis_round_trip() {
    let url = endpoint("FLOWGATE_TEST_REDIS_URL");
    let client = redis::Client::open(url.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let key = unique("rig");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("value")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET");
    let v: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(v, "value");
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
}

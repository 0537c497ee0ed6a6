//! The PostgreSQL client and `PostgresLookup` on a glommio executor against a real server
//! (`PG_URL`, or 127.0.0.1:5432): rows as JSON, the rows policies, the batch query against the
//! per-key query, a failing key among pipelined ones, a query the server cannot prepare, and
//! a connection the server terminates mid-run. Each test makes its own schema and drops it.

mod helpers;
mod real_postgres;

use bytes::Bytes;
use helpers::run;
use sluice::lookup::{BatchLookup, LayerConfig, Lookups, PostgresLookup};
use sluice::postgres::handshake::check_blocking;
use sluice::postgres::{PgClient, PgConfig, PgEndpoint, PgError, RowsPolicy, Statements, Which};
use std::num::NonZeroUsize;
use std::time::Duration;

const USERS: &str = "CREATE TABLE users (id int PRIMARY KEY, name text, score float8, \
    active bool, prefs jsonb, born date); \
    INSERT INTO users SELECT i, 'user ' || i, i / 4.0, i % 2 = 0, \
      jsonb_build_object('lang', 'l' || (i % 3)), DATE '2000-01-01' + i \
    FROM generate_series(1, 200) AS i; \
    UPDATE users SET name = 'O''Brien \"q\"', score = 'NaN' WHERE id = 7; \
    CREATE TABLE orders (user_id int, amount numeric); \
    INSERT INTO orders VALUES (1, 10.50), (1, 20), (2, 5);";

fn config(schema: &real_postgres::Schema, rows: RowsPolicy, batch: bool) -> PgConfig {
    let users = schema.table("users");
    PgConfig::new(Statements {
        query: format!("SELECT id, name, score, active, prefs, born FROM {users} WHERE id = $1"),
        batch_query: batch.then(|| {
            format!(
                "SELECT id AS key, id, name, score, active, prefs, born FROM {users} \
                 WHERE id = ANY($1)"
            )
        }),
        rows,
    })
}

fn json(value: &Option<Bytes>) -> serde_json::Value {
    serde_json::from_slice(value.as_ref().expect("a value")).expect("valid JSON")
}

#[test]
fn a_row_is_a_json_object_and_no_row_is_missing() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let schema = real_postgres::Schema::create(&url, "rows", USERS);
    let endpoint = PgEndpoint::parse(&url).unwrap();
    let config = config(&schema, RowsPolicy::First, false);
    let answers = run(move || async move {
        let client = PgClient::new(endpoint, &config);
        let keys = ["3", "7", "999", "200"];
        let answers =
            futures::future::join_all(keys.iter().map(|k| client.get(k.as_bytes()))).await;
        answers
            .into_iter()
            .map(|a| a.map(|mut v| v.pop().unwrap()))
            .collect::<Vec<_>>()
    });
    assert_eq!(
        json(answers[0].as_ref().unwrap()),
        serde_json::json!({"id": 3, "name": "user 3", "score": 0.75, "active": false,
            "prefs": {"lang": "l0"}, "born": "2000-01-04"})
    );
    let seven = json(answers[1].as_ref().unwrap());
    assert_eq!(seven["name"], "O'Brien \"q\"");
    assert_eq!(seven["score"], "NaN");
    assert_eq!(answers[2], Ok(None), "no row is a missing key");
    assert_eq!(json(answers[3].as_ref().unwrap())["active"], true);
}

#[test]
fn a_bad_key_fails_alone_and_the_pipelined_keys_after_it_are_answered() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let schema = real_postgres::Schema::create(&url, "badkey", USERS);
    let endpoint = PgEndpoint::parse(&url).unwrap();
    let config = config(&schema, RowsPolicy::First, false);
    let answers = run(move || async move {
        let client = PgClient::new(endpoint, &config);
        // Issued together: one write, one Sync; "abc" is not an int, and the server skips the
        // rest of the window after its error.
        let keys = ["1", "abc", "2", "3", "xyz", "4"];
        futures::future::join_all(keys.iter().map(|k| client.get(k.as_bytes()))).await
    });
    for (i, id) in [(0, 1), (2, 2), (3, 3), (5, 4)] {
        let value = answers[i].as_ref().unwrap();
        assert_eq!(json(&value[0])["id"], id);
    }
    for i in [1, 4] {
        match &answers[i] {
            Err(e @ PgError::Server { code, message }) => {
                assert_eq!(code, "22P02", "{message}");
                assert!(!e.is_retryable());
            }
            other => panic!("key {i}: {other:?}"),
        }
    }
}

#[test]
fn the_rows_policies_take_the_first_all_or_refuse() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let schema = real_postgres::Schema::create(&url, "policy", USERS);
    let orders = schema.table("orders");
    let endpoint = PgEndpoint::parse(&url).unwrap();
    let statements = |rows| Statements {
        query: format!("SELECT amount FROM {orders} WHERE user_id = $1 ORDER BY amount"),
        batch_query: None,
        rows,
    };
    let configs = [RowsPolicy::First, RowsPolicy::Array, RowsPolicy::Error]
        .map(|p| PgConfig::new(statements(p)));
    let answers = run(move || async move {
        let mut all = vec![];
        for config in configs {
            let client = PgClient::new(endpoint.clone(), &config);
            let (one, two) = futures::join!(client.get(b"1"), client.get(b"2"));
            all.push((one, two));
        }
        all
    });
    let value = |a: &Result<Vec<Option<Bytes>>, PgError>| json(&a.as_ref().unwrap()[0]);
    assert_eq!(value(&answers[0].0), serde_json::json!({"amount": 10.50}));
    assert_eq!(
        value(&answers[1].0),
        serde_json::json!([{"amount": 10.50}, {"amount": 20}])
    );
    assert_eq!(value(&answers[1].1), serde_json::json!([{"amount": 5}]));
    assert_eq!(answers[2].0, Err(PgError::Rows));
    assert_eq!(value(&answers[2].1), serde_json::json!({"amount": 5}));
}

#[test]
fn a_batch_query_answers_what_the_query_answers_key_by_key() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let schema = real_postgres::Schema::create(&url, "batch", USERS);
    let endpoint = PgEndpoint::parse(&url).unwrap();
    let (single, batched) = (
        config(&schema, RowsPolicy::First, false),
        config(&schema, RowsPolicy::First, true),
    );
    let (each, batch, layered, sent) = run(move || async move {
        let keys: Vec<String> = [5, 999, 7, 5, 150, 0, 42, 199, 3, 1000]
            .iter()
            .map(|i| i.to_string())
            .collect();
        let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let one = PostgresLookup::new(PgClient::new(endpoint.clone(), &single));
        let each = one.get_many(&keys).await.unwrap();
        let many = PostgresLookup::new(PgClient::new(endpoint, &batched));
        let batch = many.get_many(&keys).await.unwrap();
        // Through the layer: batches of 4 keys, coalesced.
        let layer = LayerConfig {
            batch_size: NonZeroUsize::new(4).unwrap(),
            ..LayerConfig::default()
        };
        let lookups = Lookups::new(many, layer);
        let layered = futures::future::join_all(keys.iter().map(|k| lookups.get(k))).await;
        let layered: Vec<_> = layered.into_iter().map(Result::unwrap).collect();
        (each, batch, layered, lookups.stats().requests)
    });
    assert_eq!(each.len(), 10);
    assert_eq!(
        each, batch,
        "one execution per key and the batch query agree"
    );
    assert_eq!(each, layered);
    assert_eq!(each.iter().filter(|v| v.is_none()).count(), 3);
    assert_eq!(json(&each[2])["id"], 7);
    assert!(
        sent <= 3,
        "9 distinct keys in batches of 4: {sent} requests"
    );
}

#[test]
fn a_query_the_server_cannot_prepare_is_refused_with_its_words() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let endpoint = PgEndpoint::parse(&url).unwrap();
    let statements = Statements {
        query: "SELECT * FROM sluice_no_such_table WHERE id = $1".into(),
        batch_query: None,
        rows: RowsPolicy::First,
    };
    let refused = check_blocking(&endpoint, &statements, Duration::from_secs(5)).unwrap_err();
    let text = refused.to_string();
    assert!(
        matches!(
            refused,
            PgError::Refused {
                statement: Some(Which::Query),
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(
        text.contains("sluice_no_such_table") && text.contains("the query"),
        "{text}"
    );
    let config = PgConfig::new(statements);
    let answer = run(move || async move {
        let client = PgClient::new(endpoint, &config);
        client.get(b"1").await
    });
    match answer {
        Err(PgError::Refused { reason, .. }) => assert!(reason.contains("42P01"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A wrong database is refused too, and is not retryable.
    let mut wrong = PgEndpoint::parse(&url).unwrap();
    wrong.database = "sluice_no_such_database".into();
    let refused = check_blocking(
        &wrong,
        &Statements {
            query: "SELECT $1::int AS x".into(),
            batch_query: None,
            rows: RowsPolicy::First,
        },
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert!(
        refused.to_string().contains("sluice_no_such_database") && !refused.is_retryable(),
        "{refused}"
    );
}

#[test]
fn a_terminated_connection_fails_its_lookups_retryably_and_reconnects() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let endpoint = PgEndpoint::parse(&url).unwrap();
    let config = PgConfig::new(Statements {
        // The key is the time to sleep: the lookup is in flight when its server process ends.
        query: "SELECT pg_backend_pid() AS pid, pg_sleep($1::float8) IS NULL AS slept".into(),
        batch_query: None,
        rows: RowsPolicy::First,
    });
    let (first, during, after) = run(move || async move {
        let client = PgClient::new(endpoint, &config);
        let first = client.get(b"0").await.unwrap();
        let pid = json(&first[0])["pid"].as_i64().unwrap();
        let slow = client.get(b"5");
        let kill = async {
            glommio::timer::sleep(Duration::from_millis(300)).await;
            let url = url.clone();
            glommio::executor()
                .spawn_blocking(move || {
                    real_postgres::execute(&url, &format!("SELECT pg_terminate_backend({pid})"))
                })
                .await;
        };
        let (during, ()) = futures::join!(slow, kill);
        // The driver reconnects with backoff; a lookup then goes to a new server process.
        let mut after = None;
        for _ in 0..100 {
            match client.get(b"0").await {
                Ok(v) => {
                    after = Some(json(&v[0])["pid"].as_i64().unwrap());
                    break;
                }
                Err(e) => {
                    assert!(e.is_retryable(), "{e}");
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        (pid, during, after)
    });
    match during {
        Err(e) => assert!(e.is_retryable(), "{e:?}"),
        Ok(v) => panic!("the lookup answered after its server process ended: {v:?}"),
    }
    let after = after.expect("a lookup answers after the reconnect");
    assert_ne!(after, first, "a new server process");
}

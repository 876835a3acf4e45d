use super::*;
use figment::Jail;

#[test]
#[allow(clippy::result_large_err)]
fn file_and_environment_merge_and_errors_name_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "p.toml",
            r#"
                name = "t"
                [source]
                type = "generator"
                partitions = 2
                [sink]
                type = "null"
                [runtime]
                max_in_flight_per_partition = 50
                "#,
        )?;
        jail.set_env("FLOWGATE_SOURCE__PARTITIONS", "7");
        jail.set_env("FLOWGATE_RUNTIME__BATCH__MAX_RECORDS", "9");
        jail.set_env("FLOWGATE_LOG", "debug");
        let cfg = load(Path::new("p.toml")).map_err(|e| e.to_string())?;
        match cfg.source {
            SourceConfig::Generator(g) => assert_eq!(g.partitions, 7),
            other => panic!("{other:?}"),
        }
        assert_eq!(cfg.runtime.batch.max_records, 9);
        assert_eq!(cfg.runtime.max_in_flight_per_partition, 50);

        jail.create_file("bad.toml", "name = \"t\"\n[source]\ntype = \"generator\"\npartitoins = 2\n[sink]\ntype = \"null\"\n")?;
        let err = load(Path::new("bad.toml")).unwrap_err().to_string();
        assert!(err.contains("partitoins"), "{err}");

        jail.create_file("bad2.toml", "name = \"t\"\n[source]\ntype = \"generator\"\n[sink]\ntype = \"null\"\n[runtime]\nmax_in_flight_per_partition = 0\n")?;
        let err = load(Path::new("bad2.toml")).unwrap_err().to_string();
        assert!(err.contains("max_in_flight_per_partition"), "{err}");

        jail.create_file(
            "y.yaml",
            "name: y\nsource:\n  type: generator\nsink:\n  type: jsonl\n  path: out.jsonl\n",
        )?;
        assert!(matches!(
            load(Path::new("y.yaml")).map_err(|e| e.to_string())?.sink,
            SinkConfig::Jsonl(_)
        ));
        Ok(())
    });
}

/// Loads `body` as `f.toml` and returns the error text, which must name `key`.
#[allow(clippy::result_large_err)]
fn load_err(jail: &mut Jail, body: &str) -> Result<String, figment::Error> {
    jail.create_file("f.toml", body)?;
    match load(Path::new("f.toml")) {
        Ok(cfg) => Err(format!("accepted: {cfg:?}").into()),
        Err(e) => Ok(e.to_string()),
    }
}

#[test]
#[allow(clippy::result_large_err)]
fn every_invalid_value_names_its_full_key_the_expected_type_and_the_file() {
    Jail::expect_with(|jail| {
        let base_source = "[source]\ntype = \"generator\"\n";
        let base_sink = "[sink]\ntype = \"null\"\n";
        let cases = invalid_value_cases(base_source, base_sink);
        for (body, key, expected) in cases {
            let err = load_err(jail, &body)?;
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
            assert!(err.contains(expected), "{key} ({expected}): {err}");
            assert!(err.contains("f.toml"), "{key}: no file in {err}");
        }
        // The environment's values are named by key too.
        jail.set_env("FLOWGATE_SOURCE__RATE", "fast");
        let err = load_err(jail, &format!("name = \"t\"\n{base_source}{base_sink}"))?;
        assert!(err.contains("`source.rate`"), "{err}");
        Ok(())
    });
}

/// Configurations with one invalid value each: the file, the key the error must name, and
/// what else it must say (the expected type, or the value).
fn invalid_value_cases(
    base_source: &str,
    base_sink: &str,
) -> Vec<(String, &'static str, &'static str)> {
    vec![
        (
            format!(
                "name = \"t\"\n[source]\ntype = \"kafka\"\ntopics = [\"a\"]\nmax_batch = \"lots\"\n{base_sink}"
            ),
            "source.max_batch",
            "usize",
        ),
        (
            format!("name = \"t\"\n[source]\ntype = \"kafka\"\ntopics = \"hk1\"\n{base_sink}"),
            "source.topics",
            "sequence",
        ),
        (
            format!(
                "name = \"t\"\n[source]\ntype = \"kafka\"\ntopics = [\"a\"]\nsession_timeout = 45\n{base_sink}"
            ),
            "source.session_timeout",
            "45",
        ),
        (
            format!("name = \"t\"\n[source]\ntype = \"generator\"\npartitions = -1\n{base_sink}"),
            "source.partitions",
            "-1",
        ),
        (
            format!("name = \"t\"\n[source]\ntype = \"kafak\"\n{base_sink}"),
            "source.type",
            "generator, kafka",
        ),
        (
            format!("name = \"t\"\n[source]\npartitions = 2\n{base_sink}"),
            "source",
            "missing `type`",
        ),
        (
            format!(
                "name = \"t\"\n{base_source}[sink]\ntype = \"jsonl\"\npath = \"o\"\nfsync = \"yes\"\n"
            ),
            "sink.fsync",
            "bool",
        ),
        (
            format!("name = \"t\"\n{base_source}[sink]\ntype = \"rabbitmq\"\nexchange = 5\n"),
            "sink.exchange",
            "string",
        ),
        (
            format!(
                "name = \"t\"\n{base_source}{base_sink}[dead_letter]\ntype = \"jsonl\"\npath = \"d\"\nfaults = 3\n"
            ),
            "dead_letter.faults",
            "3",
        ),
        (
            format!(
                "name = \"t\"\n{base_source}{base_sink}[store]\ntype = \"embedded\"\npath = 7\n"
            ),
            "store.path",
            "7",
        ),
        (
            format!(
                "name = \"t\"\n{base_source}{base_sink}[store]\ntype = \"memory\"\npath = \"x\"\n"
            ),
            "store.path",
            "unknown field",
        ),
        (
            format!(
                "name = \"t\"\n{base_source}{base_sink}[store]\ntype = \"postgres\"\nurl = \"postgres://h/d\"\npool_size = \"many\"\n"
            ),
            "store.pool_size",
            "many",
        ),
        (
            format!("name = \"t\"\n{base_source}{base_sink}[dedup]\nkey = 3\n"),
            "dedup.key",
            "string",
        ),
        (
            format!("name = \"t\"\n{base_source}{base_sink}[runtime.batch]\nmax_records = \"x\"\n"),
            "runtime.batch.max_records",
            "usize",
        ),
        (
            format!("name = 5\n{base_source}{base_sink}"),
            "name",
            "string",
        ),
    ]
}

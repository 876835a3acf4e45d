//! The schema: created or migrated on connect.

use super::*;

impl PostgresStore {
    pub(super) async fn migrate(&self) -> Result<(), Error> {
        let schema = self.cfg.schema.clone();
        retry!(self, "creating the schema", |c| {
            let ddl = format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 SET search_path TO {schema};
                 CREATE TABLE IF NOT EXISTS flowgate_schema (version integer NOT NULL);
                 CREATE TABLE IF NOT EXISTS flowgate_checkpoints (
                     pipeline text NOT NULL,
                     partition text NOT NULL,
                     position bytea NOT NULL,
                     position_text text NOT NULL,
                     fence bigint,
                     updated_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (pipeline, partition));
                 CREATE TABLE IF NOT EXISTS flowgate_dedup (
                     pipeline text NOT NULL,
                     key bytea NOT NULL,
                     expires_at timestamptz NOT NULL,
                     -- key first: lookups by key use the index whatever the statistics say
                     PRIMARY KEY (key, pipeline));
                 CREATE INDEX IF NOT EXISTS flowgate_dedup_expiry ON flowgate_dedup (expires_at);
                 CREATE TABLE IF NOT EXISTS flowgate_dedup_ranges (
                     pipeline text NOT NULL,
                     partition text NOT NULL,
                     first bytea NOT NULL,
                     last bytea NOT NULL,
                     expires_at timestamptz NOT NULL,
                     PRIMARY KEY (pipeline, partition, first));
                 CREATE INDEX IF NOT EXISTS flowgate_dedup_ranges_expiry ON flowgate_dedup_ranges (expires_at);
                 CREATE TABLE IF NOT EXISTS flowgate_leases (
                     pipeline text NOT NULL,
                     partition text NOT NULL,
                     owner text,
                     epoch bigint NOT NULL,
                     expires_at timestamptz NOT NULL,
                     finished boolean NOT NULL DEFAULT false,
                     PRIMARY KEY (pipeline, partition));"
            );
            async move {
                c.batch_execute(&ddl).await?;
                let tx = c.transaction().await?;
                tx.batch_execute("LOCK TABLE flowgate_schema IN EXCLUSIVE MODE")
                    .await?;
                let row = tx
                    .query_opt("SELECT max(version) FROM flowgate_schema", &[])
                    .await?;
                let current: Option<i32> = row.and_then(|r| r.get(0));
                match current {
                    None => {
                        tx.execute(
                            "INSERT INTO flowgate_schema (version) VALUES ($1)",
                            &[&SCHEMA_VERSION],
                        )
                        .await?;
                    }
                    Some(v) if v < SCHEMA_VERSION => {
                        // The DDL above added what the newer version needs.
                        tx.execute(
                            "UPDATE flowgate_schema SET version = $1",
                            &[&SCHEMA_VERSION],
                        )
                        .await?;
                    }
                    Some(v) if v > SCHEMA_VERSION => {
                        return Err(Fail::Flow(
                            Error::config(format!(
                                "postgres store: schema version {v} is newer than this flowgate understands ({SCHEMA_VERSION})"
                            ))
                            .with_hint("upgrade flowgate, or point `store.schema` elsewhere"),
                        ));
                    }
                    Some(_) => {}
                }
                tx.commit().await?;
                Ok(())
            }
        })
    }
}

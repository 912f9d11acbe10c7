-- The identity of the source record that ends at applied_seq: '<transaction uuid>@<timestamp_ns>'
-- (see docs/sql-replication.md). Written in the same prepared transaction as applied_seq; a
-- replicator that starts checks it against its source's record at applied_seq and refuses a
-- shard fed by another journal. NULL: written by a replicator older than this column.
ALTER TABLE watermark ADD COLUMN applied_record text;

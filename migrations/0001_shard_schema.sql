-- The schema of one SQL shard (a PostgreSQL database). Every shard holds the same tables; an
-- account's rows live on shard xxh3_64(account_id) % N (see docs/sql-replication.md).
-- Amounts are in minor units of their currency (cents for USD); numeric(20,0) holds every u64.

-- One row per (account, currency) on the account's shard: the balance after the newest event
-- applied, and that event's sequence number. Every batch rewrites many rows: half-empty pages
-- let PostgreSQL update them in place (HOT), which halves the cost of the upsert.
CREATE TABLE balances (
    account_id text          NOT NULL,
    currency   text          NOT NULL,
    balance    numeric(20,0) NOT NULL CHECK (balance >= 0),
    last_seq   bigint        NOT NULL CHECK (last_seq > 0),
    PRIMARY KEY (account_id, currency)
) WITH (fillfactor = 50);

-- One row per balance event (deposited, withdrawn, debited, credited) on the shard of its
-- account. A transfer's debit and credit are two rows, on two shards when the accounts differ
-- in shard. The sequence number is the journal's: an event can never be written twice.
CREATE TABLE entries (
    seq            bigint        PRIMARY KEY,
    transaction_id uuid          NOT NULL,
    account_id     text          NOT NULL,
    currency       text          NOT NULL,
    kind           text          NOT NULL
        CHECK (kind IN ('deposited', 'withdrawn', 'debited', 'credited')),
    -- Signed: positive for deposits and credits, negative for withdrawals and debits.
    amount         numeric(20,0) NOT NULL CHECK (amount <> 0),
    balance_after  numeric(20,0) NOT NULL CHECK (balance_after >= 0),
    -- Nanoseconds since the Unix epoch, as stamped on the command (exact), and the same as a
    -- timestamptz (microseconds) for people and tools.
    timestamp_ns   bigint        NOT NULL,
    created_at     timestamptz   GENERATED ALWAYS AS
        (to_timestamp(timestamp_ns::double precision / 1e9)) STORED
);
-- An account's history. (A transfer's entries are found through transfers.seq: the debit is
-- at seq, the credit at seq + 1. No index on transaction_id: it would cost a third of the
-- insert time of every batch.)
CREATE INDEX entries_account_seq ON entries (account_id, seq);

-- One row per committed transfer, on the shard of from_account. (A rejected transfer's journal
-- record does not name its accounts, so it cannot be placed; its outcome is in the engine.)
CREATE TABLE transfers (
    transaction_id uuid          PRIMARY KEY,
    from_account   text          NOT NULL,
    to_account     text          NOT NULL,
    amount         numeric(20,0) NOT NULL CHECK (amount > 0),
    currency       text          NOT NULL,
    outcome        text          NOT NULL,
    -- The sequence number of the debit (the credit is seq + 1).
    seq            bigint        NOT NULL UNIQUE,
    timestamp_ns   bigint        NOT NULL,
    created_at     timestamptz   GENERATED ALWAYS AS
        (to_timestamp(timestamp_ns::double precision / 1e9)) STORED
);

-- The watermark: exactly one row, the last journal sequence this shard reflects. It is written
-- in the same (two-phase) transaction as the rows of every batch.
CREATE TABLE watermark (
    singleton      boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    applied_seq    bigint      NOT NULL CHECK (applied_seq >= 0),
    -- Where this database sits in the shard list, and whose gids it carries.
    shard_index    integer     NOT NULL CHECK (shard_index >= 0),
    shard_count    integer     NOT NULL CHECK (shard_count > shard_index),
    coordinator_id text        NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

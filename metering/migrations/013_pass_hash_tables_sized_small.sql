-- The live pass's hash tables start small: work_mem 16MB (was 64MB) and no sorts.
--
-- The planner estimates the groups of the new events (org, type, quarter hour, user) at
-- about one per event: 115,544 for 100,000 live events that make 1,375 groups, and 80,131
-- day groups where there are 950. A hash aggregation allocates its table for the estimate,
-- as far as work_mem allows: with 64MB each of the pass's groupings zeroed and walked a
-- table of 4.1 MB for a few hundred kB of groups; with 16MB the same plan plans to spill
-- ("Planned Partitions: 4"), starts at 2.6 MB and never spills (Batches: 1). Measured on
-- bench.aggregate's 10M database, 100,000 live events per pass, variants alternated
-- (BENCHMARKS.md, 2026-12-03): aggregate_new_events 77.8 -> 74.0 ms of backend CPU (the
-- same events, 30 rounds, rolled back); committed passes 1.53 -> 1.43 and 1.47 -> 1.44
-- times the plain GROUP BY over the same rows (runs of 15 and 20 rounds): a few percent,
-- in the same direction in every run. A catch-up pass of 1,000,000 events is not slower
-- (554 -> 528 ms of CPU spread over an hour; spread over 60 days it spills at 64MB too: 160 MB
-- of temporary files at 64MB, 181 MB at 16MB, 4.6 and 4.5 s of CPU).
--
-- enable_sort = off: with less work_mem the planner prices the planned spill and would
-- rather sort all new events to group them (measured 2.36x with 8MB and sorts allowed).
-- The recompute, aggregate_usage, has had the same setting since 010.
--
-- Only the settings change; the body and promise are 012's. A later migration that
-- replaces the function must restate them (tests/metering/storage/test_migrations.py
-- checks they are in place).

ALTER FUNCTION aggregate_new_events(bigint, bigint) SET work_mem = '16MB';
ALTER FUNCTION aggregate_new_events(bigint, bigint) SET enable_sort = off;

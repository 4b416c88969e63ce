/*
 * report.sql: the comparison report of a bench run, as Markdown, from the
 * CSV files in the current directory (bench.sh runs it there with psql
 * -v main_clients=N -v drain_target=N).  Ratios are against the PL/pgSQL baseline (with
 * NOTIFY), PgQ and the two ceilings measured in the same run.
 */
\pset format unaligned
\pset tuples_only on
\pset footer off

CREATE TEMP TABLE throughput (workload text, variant text, clients int, seconds int, tps float8,
	events_per_s float8, latency_ms float8, failed bigint, events bigint, behind_at_end bigint,
	catchup_s float8, notes text);
CREATE TEMP TABLE latency (mode text, clients int, rate_target int, seconds int, rate_achieved float8,
	events bigint, p50_ms float8, p99_ms float8, max_ms float8, client_latency_ms float8,
	schedule_lag_ms float8);
CREATE TEMP TABLE lag (mode text, clients int, seconds int, write_events_per_s float8,
	max_behind bigint, end_behind bigint, max_seconds_behind float8, slope_second_half float8,
	catchup_s float8, bounded boolean);
CREATE TEMP TABLE log_size (label text, log_events bigint, mode text, clients int, seconds int,
	tps float8, latency_ms float8);
CREATE TEMP TABLE memory (at text, pid int, vmrss_kb bigint, rssanon_kb bigint, rssshmem_kb bigint,
	context_bytes bigint);
CREATE TEMP TABLE drain (events bigint, handlers int, mode text, generate_s float8, drain_s float8,
	events_per_s float8, handler_events_per_s float8);
CREATE TEMP TABLE drain_handlers (handler text, processed bigint, batches bigint,
	mean_batch_ms float8, max_batch_ms float8);
CREATE TEMP TABLE subscriptions (consumer text, events bigint, seconds float8, events_per_s float8,
	client_cpu_s float8, client_cpu_us_per_event float8);
CREATE TEMP TABLE handler_lanes (lanes int, events bigint, seconds float8, events_per_s float8);

\copy throughput FROM 'throughput.csv' CSV HEADER
\copy latency FROM 'latency.csv' CSV HEADER
\copy lag FROM 'lag.csv' CSV HEADER
\copy log_size FROM 'log_size.csv' CSV HEADER
\copy memory FROM 'memory.csv' CSV HEADER
\copy drain FROM 'drain.csv' CSV HEADER
\copy drain_handlers FROM 'drain_handlers.csv' CSV HEADER
\copy subscriptions FROM 'subscriptions.csv' CSV HEADER
\copy handler_lanes FROM 'handler_lanes.csv' CSV HEADER

CREATE TEMP TABLE variants (variant text, ord int, label text);
INSERT INTO variants VALUES
	('ext_commit', 1, 'extension, notify_mode commit'),
	('ext_relay', 2, 'extension, notify_mode relay'),
	('ext_off', 3, 'extension, notify_mode off'),
	('plpgsql_notify', 4, 'PL/pgSQL + triggers, NOTIFY (baseline)'),
	('plpgsql_nonotify', 5, 'PL/pgSQL + triggers, no NOTIFY'),
	('pgq', 6, 'PgQ: insert_event, pgqd, 3 PL/pgSQL consumers'),
	('ceiling_write', 7, 'write ceiling (task + event rows)'),
	('ceiling_pipeline', 8, 'pipeline ceiling (+ handler rows)');

CREATE TEMP TABLE client_counts AS SELECT DISTINCT clients FROM throughput ORDER BY clients;

CREATE FUNCTION pg_temp.num(x float8, digits int DEFAULT 0) RETURNS text
	LANGUAGE sql IMMUTABLE
	RETURN CASE WHEN x IS NULL THEN 'n/a' ELSE to_char(round(x::numeric, digits), 'FM999,999,999,990' ||
		CASE WHEN digits > 0 THEN '.' || repeat('0', digits) ELSE '' END) END;
CREATE FUNCTION pg_temp.ratio(a float8, b float8) RETURNS text
	LANGUAGE sql IMMUTABLE
	RETURN CASE WHEN a IS NULL OR b IS NULL OR b = 0 THEN 'n/a'
		ELSE to_char(round((a / b)::numeric, 2), 'FM990.00') || '×' END;
CREATE FUNCTION pg_temp.tps(w text, v text, c int) RETURNS float8
	LANGUAGE sql STABLE
	RETURN (SELECT t.tps FROM throughput t WHERE t.workload = w AND t.variant = v AND t.clients = c);

\qecho '## Throughput'
\qecho
\qecho 'Transactions per second as pgbench counts them: one `create_task` call, or one'
\qecho 'lifecycle (create, start, complete: three transactions, four events). Each cell:'
\qecho 'rate, then its ratio to the PL/pgSQL baseline with NOTIFY at the same client count.'
\qecho

SELECT format(E'### %s\n\n| variant | %s | × pipeline ceiling @%s | × write ceiling @%s | × PgQ @%s |\n|---|%s---|---|---|',
			  w.workload,
			  (SELECT string_agg(clients || CASE WHEN clients = 1 THEN ' client' ELSE ' clients' END, ' | ' ORDER BY clients) FROM client_counts),
			  :main_clients, :main_clients, :main_clients,
			  (SELECT string_agg('---|', '' ORDER BY clients) FROM client_counts))
	   || E'\n' ||
	   (SELECT string_agg(format('| %s | %s | %s | %s | %s |', v.label,
				(SELECT string_agg(CASE WHEN pg_temp.tps(w.workload, v.variant, cc.clients) IS NULL THEN 'n/a'
						ELSE pg_temp.num(pg_temp.tps(w.workload, v.variant, cc.clients)) || ' (' ||
							 pg_temp.ratio(pg_temp.tps(w.workload, v.variant, cc.clients),
										   pg_temp.tps(w.workload, 'plpgsql_notify', cc.clients)) || ')' END,
						' | ' ORDER BY cc.clients) FROM client_counts cc),
				pg_temp.ratio(pg_temp.tps(w.workload, v.variant, :main_clients),
							  pg_temp.tps(w.workload, 'ceiling_pipeline', :main_clients)),
				pg_temp.ratio(pg_temp.tps(w.workload, v.variant, :main_clients),
							  pg_temp.tps(w.workload, 'ceiling_write', :main_clients)),
				pg_temp.ratio(pg_temp.tps(w.workload, v.variant, :main_clients),
							  pg_temp.tps(w.workload, 'pgq', :main_clients))),
			E'\n' ORDER BY v.ord)
		FROM variants v)
	   || E'\n'
FROM (SELECT DISTINCT workload FROM throughput) AS w
ORDER BY w.workload;

\qecho '### Did the workers keep up?'
\qecho
\qecho 'Extension and PgQ runs: events written per second, events not yet handled when'
\qecho 'pgbench stopped (PgQ: summed over its consumers from the queue''s event id sequence,'
\qecho 'approximate), and the seconds the workers or consumers then took to catch up.'
\qecho
\qecho '| workload | variant | clients | events/s | behind at end | catch-up (s) | notes |'
\qecho '|---|---|---|---|---|---|---|'
SELECT format('| %s | %s | %s | %s | %s | %s | %s |', t.workload, v.label, t.clients,
			  pg_temp.num(t.events_per_s), pg_temp.num(t.behind_at_end), pg_temp.num(t.catchup_s, 2),
			  coalesce(t.notes, ''))
FROM throughput t JOIN variants v USING (variant)
WHERE (t.variant LIKE 'ext%' OR t.variant = 'pgq') AND t.tps IS NOT NULL
ORDER BY t.workload, v.ord, t.clients;
\qecho

\qecho '## Drain of a backlog'
\qecho
\qecho 'The extension: handlers disabled while the backlog is written, then enabled. PgQ:'
\qecho 'pgqd ticking and the consumers stopped while it is written, then the three'
\qecho 'consumers started.'
\qecho
\qecho '| variant | events | handlers | written in (s) | drained in (s) | events/s | handler-events/s |'
\qecho '|---|---|---|---|---|---|---|'
SELECT format('| %s | %s | %s | %s | %s | %s | %s |',
			  CASE WHEN mode = 'pgq' THEN 'PgQ' ELSE 'extension, notify_mode ' || mode END,
			  pg_temp.num(events), handlers, pg_temp.num(generate_s, 1), pg_temp.num(drain_s, 1),
			  pg_temp.num(events_per_s), pg_temp.num(handler_events_per_s))
FROM drain ORDER BY mode = 'pgq';
\qecho
\qecho '| handler | processed | batches | mean batch (ms) | max batch (ms) |'
\qecho '|---|---|---|---|---|'
SELECT format('| %s | %s | %s | %s | %s |', handler, pg_temp.num(processed), pg_temp.num(batches),
			  pg_temp.num(mean_batch_ms, 2), pg_temp.num(max_batch_ms, 2))
FROM drain_handlers ORDER BY handler;
\qecho

\qecho '## Latency from commit to the audit row'
\qecho
\qecho '`audit_log.recorded_at - pg_xact_commit_timestamp(events.xact_id)`, for every event'
\qecho 'of a `create_task` run paced with `pgbench --rate` (PgQ: the `ev_txid` of the event'
\qecho 'in the queue''s tables instead of `events.xact_id`).'
\qecho
\qecho '| notify_mode / variant | clients | target events/s | achieved events/s | p50 (ms) | p99 (ms) | max (ms) | client latency (ms) | schedule lag (ms) |'
\qecho '|---|---|---|---|---|---|---|---|---|'
SELECT format('| %s | %s | %s | %s | %s | %s | %s | %s | %s |', mode, clients, rate_target,
			  pg_temp.num(rate_achieved), pg_temp.num(p50_ms, 2), pg_temp.num(p99_ms, 2),
			  pg_temp.num(max_ms, 2), pg_temp.num(client_latency_ms, 2), pg_temp.num(schedule_lag_ms, 2))
FROM latency ORDER BY array_position(ARRAY['commit', 'relay', 'off', 'pgq'], mode);
\qecho

\qecho '## Handler lag at the maximum write rate'
\qecho
\qecho '`create_task`, unthrottled; `events_behind` sampled every second. Bounded: over the'
\qecho 'second half of the run the backlog grew by less than 5% of the write rate.'
\qecho
\qecho '| notify_mode | clients | seconds | events/s written | max behind | behind at end | max seconds behind | backlog growth, 2nd half (events/s) | catch-up (s) | bounded |'
\qecho '|---|---|---|---|---|---|---|---|---|---|'
SELECT format('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |', mode, clients, seconds,
			  pg_temp.num(write_events_per_s), pg_temp.num(max_behind), pg_temp.num(end_behind),
			  pg_temp.num(max_seconds_behind, 2), pg_temp.num(slope_second_half, 1),
			  pg_temp.num(catchup_s, 2), CASE WHEN bounded THEN 'yes' ELSE 'no' END)
FROM lag ORDER BY array_position(ARRAY['commit', 'relay', 'off'], mode);
\qecho

\qecho '## Worker memory'
\qecho
\qecho 'Per worker: VmRSS (all resident pages, shared buffers it touched included),'
\qecho 'RssAnon (its private memory) and the total of its memory contexts.'
\qecho
\qecho '| when | pid | VmRSS (MB) | RssAnon (MB) | RssShmem (MB) | memory contexts (MB) |'
\qecho '|---|---|---|---|---|---|'
SELECT format('| %s | %s | %s | %s | %s | %s |', at, pid, pg_temp.num(vmrss_kb / 1024.0, 1),
			  pg_temp.num(rssanon_kb / 1024.0, 1), pg_temp.num(rssshmem_kb / 1024.0, 1),
			  pg_temp.num(context_bytes / 1048576.0, 2))
FROM memory ORDER BY array_position(ARRAY['before_drain', 'after_drain', 'after_log_fill'], at), pid;
\qecho

\qecho '## create_task and the size of the event log'
\qecho
\qecho '| log | events in the log | notify_mode | clients | tps | × empty log |'
\qecho '|---|---|---|---|---|---|'
SELECT format('| %s | %s | %s | %s | %s | %s |', label, pg_temp.num(log_events), mode, clients, pg_temp.num(tps),
			  pg_temp.ratio(tps, (SELECT tps FROM log_size WHERE label = 'empty')))
FROM log_size ORDER BY log_events;
\qecho

\qecho '## Subscriptions'
\qecho
\qecho 'One consumer drains the backlog in 1,000-event batches (bench/subscriptions.sh:'
\qecho 'sql = a psycopg client, jsonl = task_events_consume --jsonl > /dev/null,'
\qecho 'post = task_events_consume --post to a local HTTP server, one request per event).'
\qecho
\qecho '| consumer | events | seconds | events/s | client CPU (us/event) |'
\qecho '|---|---|---|---|---|'
SELECT format('| %s | %s | %s | %s | %s |', consumer, pg_temp.num(events), pg_temp.num(seconds, 2),
			  pg_temp.num(events_per_s), pg_temp.num(client_cpu_us_per_event, 1))
FROM subscriptions ORDER BY array_position(ARRAY['sql', 'jsonl', 'post'], consumer);
\qecho

\qecho '## Handler lanes'
\qecho
\qecho 'A handler sleeping per event drains a backlog in 1 lane, then in 4 (bench/handler_lanes.sh).'
\qecho
\qecho '| lanes | events | seconds | events/s |'
\qecho '|---|---|---|---|'
SELECT format('| %s | %s | %s | %s |', lanes, pg_temp.num(events), pg_temp.num(seconds, 2),
			  pg_temp.num(events_per_s))
FROM handler_lanes ORDER BY lanes;
\qecho

/* The targets of issues 4 and 14 (where 14 raised a bar, its bar). */
CREATE TEMP TABLE targets (ord serial, target text, measured text, met boolean);
INSERT INTO targets (target, measured, met)
SELECT format('%s: relay >= 2x PL/pgSQL (%s clients)', w, :main_clients),
	   pg_temp.ratio(pg_temp.tps(w, 'ext_relay', :main_clients), pg_temp.tps(w, 'plpgsql_notify', :main_clients)),
	   pg_temp.tps(w, 'ext_relay', :main_clients) >= 2 * pg_temp.tps(w, 'plpgsql_notify', :main_clients)
FROM unnest(ARRAY['create_task', 'lifecycle']) AS w;
INSERT INTO targets (target, measured, met)
SELECT format('%s: relay >= 1.0x pipeline ceiling (%s clients)', w, :main_clients),
	   pg_temp.ratio(pg_temp.tps(w, 'ext_relay', :main_clients), pg_temp.tps(w, 'ceiling_pipeline', :main_clients)),
	   pg_temp.tps(w, 'ext_relay', :main_clients) >= pg_temp.tps(w, 'ceiling_pipeline', :main_clients)
FROM unnest(ARRAY['create_task', 'lifecycle']) AS w;
INSERT INTO targets (target, measured, met)
SELECT format('%s: relay workers keep up (%s clients; caught up within max(1 s, 10%% of the run))', w, :main_clients),
	   (SELECT format('%s behind at end, caught up in %s s', pg_temp.num(behind_at_end), pg_temp.num(catchup_s, 2))
		FROM throughput WHERE workload = w AND variant = 'ext_relay' AND clients = :main_clients),
	   (SELECT catchup_s <= greatest(1, 0.1 * seconds) FROM throughput
		WHERE workload = w AND variant = 'ext_relay' AND clients = :main_clients)
FROM unnest(ARRAY['create_task', 'lifecycle']) AS w;
/* Issue 14: PgQ doing the same work, its consumers keeping up. */
INSERT INTO targets (target, measured, met)
SELECT format('%s: relay >= 1.5x PgQ (%s clients)', w, :main_clients),
	   pg_temp.ratio(pg_temp.tps(w, 'ext_relay', :main_clients), pg_temp.tps(w, 'pgq', :main_clients)),
	   pg_temp.tps(w, 'ext_relay', :main_clients) >= 1.5 * pg_temp.tps(w, 'pgq', :main_clients)
FROM unnest(ARRAY['create_task', 'lifecycle']) AS w;
INSERT INTO targets (target, measured, met)
SELECT format('%s: PgQ consumers keep up (%s clients; caught up within max(1 s, 10%% of the run))', w, :main_clients),
	   (SELECT CASE WHEN catchup_s IS NULL THEN notes
					ELSE format('%s behind at end, caught up in %s s', pg_temp.num(behind_at_end),
								pg_temp.num(catchup_s, 2)) END
		FROM throughput WHERE workload = w AND variant = 'pgq' AND clients = :main_clients),
	   (SELECT catchup_s IS NOT NULL AND catchup_s <= greatest(1, 0.1 * seconds) FROM throughput
		WHERE workload = w AND variant = 'pgq' AND clients = :main_clients)
FROM unnest(ARRAY['create_task', 'lifecycle']) AS w;
INSERT INTO targets (target, measured, met)
SELECT format('%s: commit >= 1.5x PL/pgSQL (%s clients)', w, :main_clients),
	   pg_temp.ratio(pg_temp.tps(w, 'ext_commit', :main_clients), pg_temp.tps(w, 'plpgsql_notify', :main_clients)),
	   pg_temp.tps(w, 'ext_commit', :main_clients) >= 1.5 * pg_temp.tps(w, 'plpgsql_notify', :main_clients)
FROM unnest(ARRAY['create_task', 'lifecycle']) AS w;
INSERT INTO targets (target, measured, met)
SELECT format('drain >= %s events/s', pg_temp.num(:drain_target)),
	   (SELECT pg_temp.num(events_per_s) || ' events/s' FROM drain WHERE mode <> 'pgq'),
	   (SELECT events_per_s >= :drain_target FROM drain WHERE mode <> 'pgq');
INSERT INTO targets (target, measured, met)
SELECT format('latency at %s events/s (%s): p50 <= %s ms, p99 <= %s ms', rate_target, mode, b.p50, b.p99),
	   format('p50 %s ms, p99 %s ms (achieved %s events/s)', pg_temp.num(p50_ms, 2), pg_temp.num(p99_ms, 2),
			  pg_temp.num(rate_achieved)),
	   p50_ms <= b.p50 AND p99_ms <= b.p99 AND rate_achieved >= 0.9 * rate_target
FROM latency
CROSS JOIN LATERAL (SELECT CASE WHEN mode = 'relay' THEN 1 ELSE 2 END AS p50,
						   CASE WHEN mode = 'relay' THEN 5 ELSE 10 END AS p99) b
WHERE mode <> 'pgq' ORDER BY array_position(ARRAY['relay', 'commit', 'off'], mode);
INSERT INTO targets (target, measured, met)
SELECT format('lag bounded at max write rate (%s)', mode),
	   format('%s events/s written, max %s behind, growth %s events/s', pg_temp.num(write_events_per_s),
			  pg_temp.num(max_behind), pg_temp.num(slope_second_half, 1)),
	   bounded
FROM lag ORDER BY array_position(ARRAY['relay', 'commit', 'off'], mode);
INSERT INTO targets (target, measured, met)
SELECT format('worker %s grows < 10 MB over a million events', k),
	   string_agg(format('pid %s: %s MB', b.pid, to_char(round((CASE k WHEN 'VmRSS' THEN a.vmrss_kb - b.vmrss_kb
				ELSE a.rssanon_kb - b.rssanon_kb END) / 1024.0, 1), 'FM99990.0')), ', ' ORDER BY b.pid),
	   bool_and(CASE k WHEN 'VmRSS' THEN a.vmrss_kb - b.vmrss_kb ELSE a.rssanon_kb - b.rssanon_kb END < 10240)
FROM memory b JOIN memory a ON a.pid = b.pid AND a.at = 'after_drain'
CROSS JOIN unnest(ARRAY['VmRSS', 'RssAnon (private)']) AS k
WHERE b.at = 'before_drain'
GROUP BY k ORDER BY k DESC;
INSERT INTO targets (target, measured, met)
SELECT format('create_task with %s events within 10%% of an empty log', pg_temp.num(f.log_events)),
	   pg_temp.ratio(f.tps, e.tps), f.tps >= 0.9 * e.tps
FROM log_size f, log_size e WHERE f.label = 'full' AND e.label = 'empty';
INSERT INTO targets (target, measured, met)
SELECT format('subscriptions: %s >= %s events/s', consumer, pg_temp.num(bar)),
	   pg_temp.num(events_per_s) || ' events/s', events_per_s >= bar
FROM subscriptions
JOIN (VALUES ('sql', 200000), ('jsonl', 150000)) AS b (consumer, bar) USING (consumer)
ORDER BY bar DESC;
INSERT INTO targets (target, measured, met)
SELECT 'handler lanes: 4 lanes >= 3x 1 lane', pg_temp.ratio(four.events_per_s, one.events_per_s),
	   four.events_per_s >= 3 * one.events_per_s
FROM handler_lanes one, handler_lanes four WHERE one.lanes = 1 AND four.lanes = 4;

\qecho '## Targets'
\qecho
\qecho '| target | measured | met |'
\qecho '|---|---|---|'
SELECT format('| %s | %s | %s |', target, coalesce(measured, 'n/a'),
			  CASE WHEN met THEN 'met' WHEN NOT met THEN '**not met**' ELSE 'n/a' END)
FROM targets ORDER BY ord;

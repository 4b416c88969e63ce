#!/usr/bin/python3
"""A consumer of a task_events subscription, written against the SQL API
only (issue 11), with psycopg 3: the client of 027_subscription_consumer.pl.

The loop: LISTEN task_events_subscriptions; read_batch(subscription,
--batch, --lease); append one line per event of the batch to --out and
fsync it; ack_batch.  When read_batch returns nothing, wait for a
notification (at most one second) and read again.  SIGTERM: the batch in
hand is finished (written and acknowledged), then exit 0.

Modes:
  at-least-once (default)  ack_batch after the lines are on disk: a crash
                           in between delivers the batch again.
  exactly-once             the batch's events are inserted into --table and
                           ack_batch is called in the same transaction: the
                           table holds each event once.  --table needs the
                           columns (event_id uuid, seq bigint, subscription
                           text, batch_id bigint, consumer text).

Output (--out, opened O_APPEND: several consumers share one file, each batch
is one write): tab-separated lines
  consumer subscription lane batch_id seq event_id aggregate_id aggregate_version
Notifications (--notify-log): one line per notification received on the
channel: consumer, channel, payload.

Fault injection for the test: --die-before-ack N makes the process SIGKILL
itself before acknowledging its Nth batch (the lines are written; in
exactly-once mode the insert and ack_batch are done, not the COMMIT).

Exit status: 0 after SIGTERM; 2 after a database error other than 55000
from ack_batch (the lease expired and the lane was read again: logged, the
loop goes on) and for bad arguments (argparse).
"""

import argparse
import os
import select
import signal
import sys

import psycopg
from psycopg import errors, sql

CHANNEL = "task_events_subscriptions"

stopping = False


def on_sigterm(signum, frame):
    global stopping
    stopping = True


def log(args, msg):
    print(f"[{args.name} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


class Consumer:
    def __init__(self, args):
        self.args = args
        self.pending = 0  # notifications received since the last read
        self.batches = 0
        self.out = os.open(args.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.notify_log = None
        if args.notify_log:
            self.notify_log = os.open(
                args.notify_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.conn = psycopg.connect(args.dsn, autocommit=True,
                                    application_name=f"consumer {args.name}")
        self.conn.add_notify_handler(self.on_notify)
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        if args.table:
            self.insert = sql.SQL(
                "INSERT INTO {} (event_id, seq, subscription, batch_id, consumer) "
                "VALUES (%s, %s, %s, %s, %s)").format(
                    sql.Identifier(*args.table.split(".")))

    def on_notify(self, n):
        # The payload is the name of a subscription with new events: only
        # ours wakes the loop.
        if n.payload == self.args.subscription:
            self.pending += 1
        if self.notify_log is not None:
            line = f"{self.args.name}\t{n.channel}\t{n.payload}\n"
            os.write(self.notify_log, line.encode())
            os.fsync(self.notify_log)

    def wait_for_notification(self, timeout):
        """Return once a notification for our subscription arrived (or had
        arrived during a query since the last read), or data came in, or
        after timeout seconds at most."""
        if self.pending == 0:
            ready, _, _ = select.select([self.conn.fileno()], [], [], timeout)
            if ready:
                pgconn = self.conn.pgconn
                pgconn.consume_input()
                while (pgn := pgconn.notifies()) is not None:
                    self.on_notify(psycopg.Notify(pgn.relname.decode(),
                                                  pgn.extra.decode(), pgn.be_pid))
        self.pending = 0

    def write_lines(self, rows):
        a = self.args
        data = "".join(
            f"{a.name}\t{a.subscription}\t{r[1]}\t{r[0]}\t{r[2]}\t{r[3]}\t{r[4]}\t{r[5]}\n"
            for r in rows)
        os.write(self.out, data.encode())  # one write: batches never interleave
        os.fsync(self.out)

    def die_now(self):
        return self.args.die_before_ack == self.batches

    def handle(self, rows):
        """Write the batch, then acknowledge it (with the inserts in
        exactly-once mode).  Returns False when the lease was lost."""
        a = self.args
        batch_id = rows[0][0]
        self.batches += 1
        self.write_lines(rows)
        try:
            if a.mode == "exactly-once":
                with self.conn.transaction():
                    with self.conn.cursor() as cur:
                        cur.executemany(self.insert, [
                            (r[3], r[2], a.subscription, batch_id, a.name) for r in rows])
                        cur.execute("SELECT task_events.ack_batch(%s, %s)",
                                    (a.subscription, batch_id))
                        if self.die_now():
                            os.kill(os.getpid(), signal.SIGKILL)
            else:
                if self.die_now():
                    os.kill(os.getpid(), signal.SIGKILL)
                self.conn.execute("SELECT task_events.ack_batch(%s, %s)",
                                  (a.subscription, batch_id))
        except errors.ObjectNotInPrerequisiteState as ex:
            log(a, f"batch {batch_id} not acknowledged (55000): {ex}")
            return False
        return True

    def run(self):
        a = self.args
        read = ("SELECT batch_id, lane, seq, event_id, aggregate_id, aggregate_version "
                "FROM task_events.read_batch(%s, %s, %s::interval)")
        while not stopping:
            rows = self.conn.execute(read, (a.subscription, a.batch, a.lease)).fetchall()
            if rows:
                self.handle(rows)
            else:
                self.wait_for_notification(1.0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--subscription", required=True)
    p.add_argument("--name", default="consumer")
    p.add_argument("--out", required=True)
    p.add_argument("--notify-log")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lease", default="30 seconds")
    p.add_argument("--mode", choices=["at-least-once", "exactly-once"],
                   default="at-least-once")
    p.add_argument("--table")
    p.add_argument("--die-before-ack", type=int, default=0, metavar="N")
    args = p.parse_args()
    if (args.mode == "exactly-once") != (args.table is not None):
        p.error("--table goes with --mode exactly-once, and only with it")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        consumer = Consumer(args)
        log(args, f"consuming {args.subscription} ({args.mode})")
        consumer.run()
    except psycopg.Error as ex:
        log(args, f"database error: {type(ex).__name__}: {ex}"
            + (f" (SQLSTATE {ex.sqlstate})" if ex.sqlstate else ""))
        return 2
    log(args, f"stopped by SIGTERM after {consumer.batches} batches")
    consumer.conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

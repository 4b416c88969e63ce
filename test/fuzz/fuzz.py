#!/usr/bin/env python3
"""Fuzz the SQL surface of task_events (run by scripts/fuzz.sh).

Calls every function of the extension (found in the catalog, so functions
added later are fuzzed too) and reads every view, with random and hostile
arguments: NULLs, empty and white-space strings, strings at and past the
length limits, 1 MB strings, random valid UTF-8, control characters,
invalid UTF-8 sent raw by the client (client_encoding UTF8 and SQL_ASCII) or
made with convert_from, odd enum labels, extreme versions, random and real
uuids, and for the handler functions (any function taking
task_events.events[]) NULL arrays, empty arrays, NULL elements, events with
NULL or hostile fields, multi-dimensional arrays, arrays with other lower
bounds, and big arrays.  Calls run in varied contexts: autocommit,
subtransactions rolled back, REPEATABLE READ / SERIALIZABLE, READ ONLY, a
1 ms statement_timeout (cancel in the middle), a non-superuser role,
PREPARE TRANSACTION, in each task_events.notify_mode.

A call fails the run when the backend's connection is lost (crash) or the
error's SQLSTATE is of class XX (internal error, data or index corrupted), or
an error has no SQLSTATE.  Every other error is the server refusing bad
input, which is what it should do; their SQLSTATEs are counted.  After the
calls, the task/event invariants and the handlers' recorded errors are
checked.  Only the standard library and libpq (through ctypes): no driver to
install.  Exit status 0 = no finding, 1 = findings, 2 = could not run.
"""
import argparse
import ctypes
import json
import os
import random
import sys
import time
import uuid

# ---------------------------------------------------------------- libpq ----
pq = ctypes.CDLL("libpq.so.5")
pq.PQconnectdb.restype = ctypes.c_void_p
pq.PQconnectdb.argtypes = [ctypes.c_char_p]
pq.PQstatus.argtypes = [ctypes.c_void_p]
pq.PQexec.restype = ctypes.c_void_p
pq.PQexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
pq.PQresultStatus.argtypes = [ctypes.c_void_p]
pq.PQresultErrorField.restype = ctypes.c_char_p
pq.PQresultErrorField.argtypes = [ctypes.c_void_p, ctypes.c_int]
pq.PQerrorMessage.restype = ctypes.c_char_p
pq.PQerrorMessage.argtypes = [ctypes.c_void_p]
pq.PQclear.argtypes = [ctypes.c_void_p]
pq.PQfinish.argtypes = [ctypes.c_void_p]
pq.PQntuples.argtypes = [ctypes.c_void_p]
pq.PQnfields.argtypes = [ctypes.c_void_p]
pq.PQgetvalue.restype = ctypes.c_char_p
pq.PQgetvalue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
pq.PQgetisnull.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
pq.PQsetClientEncoding.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
pq.PQconsumeInput.argtypes = [ctypes.c_void_p]
pq.PQnotifies.restype = ctypes.c_void_p
pq.PQnotifies.argtypes = [ctypes.c_void_p]
pq.PQfreemem.argtypes = [ctypes.c_void_p]
pq.PQtransactionStatus.argtypes = [ctypes.c_void_p]
PQTRANS_IDLE = 0

CONNECTION_OK = 0
PGRES_COMMAND_OK, PGRES_TUPLES_OK = 1, 2
PG_DIAG_SQLSTATE, PG_DIAG_MESSAGE_PRIMARY = ord("C"), ord("M")


class Lost(Exception):
    """The connection to the server was lost."""


class Conn:
    def __init__(self, conninfo):
        self.conninfo = conninfo
        self.c = None
        self.connect()

    def connect(self, wait=90.0):
        """Connect, retrying while the server restarts (after a crash)."""
        deadline = time.time() + wait
        while True:
            if self.c:
                pq.PQfinish(self.c)
            self.c = pq.PQconnectdb(self.conninfo.encode())
            if pq.PQstatus(self.c) == CONNECTION_OK:
                break
            if time.time() > deadline:
                raise SystemExit("fuzz: cannot connect: " + pq.PQerrorMessage(self.c).decode(errors="replace"))
            time.sleep(0.5)
        self.q("SET statement_timeout = '30s'")
        self.q("SET client_min_messages = error")

    def run(self, sql):
        """Run sql (bytes or str).  Returns (ok, sqlstate, message, rows)."""
        if isinstance(sql, str):
            sql = sql.encode()
        res = pq.PQexec(self.c, sql)
        try:
            if not res or pq.PQstatus(self.c) != CONNECTION_OK:
                raise Lost(pq.PQerrorMessage(self.c).decode(errors="replace"))
            st = pq.PQresultStatus(res)
            if st in (PGRES_COMMAND_OK, PGRES_TUPLES_OK):
                rows = []
                for i in range(min(pq.PQntuples(res), 1000)):
                    rows.append(tuple(None if pq.PQgetisnull(res, i, j) else pq.PQgetvalue(res, i, j).decode(errors="replace")
                                      for j in range(pq.PQnfields(res))))
                return True, None, None, rows
            code = pq.PQresultErrorField(res, PG_DIAG_SQLSTATE)
            msg = pq.PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
            return False, code.decode() if code else None, (msg or b"").decode(errors="replace"), []
        finally:
            if res:
                pq.PQclear(res)
            self.drain_notifies()

    def drain_notifies(self):
        pq.PQconsumeInput(self.c)
        while True:
            n = pq.PQnotifies(self.c)
            if not n:
                break
            pq.PQfreemem(n)

    def q(self, sql):
        ok, code, msg, rows = self.run(sql)
        if not ok:
            raise RuntimeError(f"fuzz setup query failed ({code}): {msg}: {sql[:200]}")
        return rows


def lit(s):
    """A SQL string literal (standard_conforming_strings on)."""
    return "'" + s.replace("'", "''") + "'"


# ------------------------------------------------------------- values -----
class Gen:
    def __init__(self, rnd, long_mode):
        self.r = rnd
        self.long = long_mode
        self.task_ids = []
        self.event_ids = []
        self.huge_budget = 60 if not long_mode else 400   # 1 MB values

    def rand_unicode(self, n):
        r = self.r
        out = []
        for _ in range(n):
            k = r.random()
            if k < 0.5:
                c = r.randint(0x20, 0x7E)
            elif k < 0.7:
                c = r.randint(0xA0, 0x7FF)
            elif k < 0.85:
                c = r.randint(0x800, 0xFFFF)
                if 0xD800 <= c <= 0xDFFF:
                    c = 0x4E2D
            elif k < 0.95:
                c = r.randint(0x10000, 0x10FFFF)
            else:
                c = r.randint(1, 0x1F)
            out.append(chr(c))
        return "".join(out)

    def huge(self):
        if self.huge_budget <= 0:
            return lit("x" * 300)
        self.huge_budget -= 1
        return self.r.choice([
            "repeat('a', 1048576)",
            "repeat(' ', 1048576)",
            "repeat(E'\\u3000', 349525)",
            "repeat('😀', 262144)",
            lit("x" * 1048576),
        ])

    def text(self):
        r = self.r
        k = r.randint(0, 27)
        if k == 0:
            return "NULL"
        if k == 1:
            return "''"
        if k == 2:
            return lit(r.choice([" ", "\t", "\n", "  \r\n\t ", "\u3000", "\u00a0\u2003", "\ufeff", "\u2028\u2029", "\u0085", "\u200b"]))
        if k == 3:
            n = r.choice([199, 200, 201, 499, 500, 501, 9999, 10000, 10001])
            return lit(r.choice(["x", "é", "😀", "中"]) * n)
        if k == 4:
            return self.huge()
        if k == 5:
            return lit("".join(chr(r.randint(1, 31)) for _ in range(r.randint(1, 40))))
        if k == 6:
            return lit(r.choice(['"', "\\", '\\"', '{"a": 1}', "\\u0000", "%s%n%x", "'); DROP TABLE task_events.events; --",
                                 "</script>", "${x}", "NaN", "-infinity", "null"]))
        if k == 7:
            # Invalid UTF-8 made on the server: must be refused (22021).
            return f"convert_from({lit(self.bytea_hex())}::bytea, 'UTF8')"
        if k == 8:
            return f"convert_from({lit(self.bytea_hex())}::bytea, 'LATIN1')"
        if k == 9:
            return r.choice(["chr(0)", "E'\\u0000'", "E'\\xff'", "U&'\\D800'", "chr(1114112)"])
        if k == 10:
            return r.choice(["now()::text", "123::text", "gen_random_uuid()::text", "repeat('ab', 100)"])
        return lit(self.rand_unicode(r.choice([1, 2, 5, 20, 100, 300])))

    def bytea_hex(self):
        r = self.r
        b = bytes(r.randint(0, 255) for _ in range(r.randint(1, 30)))
        if r.random() < 0.5:
            b += r.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
        return "\\x" + b.hex()

    def uuid(self):
        r = self.r
        k = r.randint(0, 9)
        if k == 0:
            return "NULL"
        if k in (1, 2, 3, 4) and self.task_ids:
            return lit(r.choice(self.task_ids)) + "::uuid"
        if k == 5 and self.event_ids:
            return lit(r.choice(self.event_ids)) + "::uuid"
        if k == 6:
            return r.choice(["'00000000-0000-0000-0000-000000000000'::uuid", "'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid",
                             "'not-a-uuid'::uuid", "''::uuid", "'{12345678-1234-1234-1234-123456789abc}'::uuid"])
        return lit(str(uuid.UUID(int=r.getrandbits(128)))) + "::uuid"

    def status(self):
        r = self.r
        k = r.randint(0, 6)
        if k == 0:
            return "NULL"
        if k == 1:
            return lit(r.choice(["PENDING", "", " pending", "pending ", "done", "in-progress", "completed\u0000"[:9], "cancelled;"]))
        if k == 2:
            return r.choice(["1::task_events.task_status", "'pending'::text", "NULL::task_events.task_status"])
        return lit(r.choice(["pending", "in_progress", "completed", "cancelled"])) + "::task_events.task_status"

    def bigint(self):
        return self.r.choice(["NULL", "0", "1", "2", "3", "4", "5", "-1", "9223372036854775807", "(-9223372036854775807 - 1)",
                              "2147483648", "'9223372036854775808'::bigint", "'abc'::bigint", str(self.r.randint(-10**12, 10**12))])

    def int4(self):
        return self.r.choice(["NULL", "0", "1", "2", "1000", "-1", "2147483647", "(-2147483647 - 1)", "'2147483648'::int",
                              str(self.r.randint(-100000, 100000))])

    def handler_name(self):
        r = self.r
        if r.random() < 0.6:
            return r.choice(["'audit'", "'analytics'", "'notification'", "'relay'", "NULL"])
        return r.choice(["''", "'AUDIT'", "'audit '", "'no_such_handler'", self.text()])

    def timestamptz(self):
        return self.r.choice(["NULL", "now()", "'infinity'::timestamptz", "'-infinity'::timestamptz",
                              "'4713-01-01 BC'::timestamptz", "'294276-12-31 23:59:59+00'::timestamptz", "'epoch'::timestamptz",
                              "clock_timestamp() + interval '100 years'"])

    def jsonb(self):
        r = self.r
        k = r.randint(0, 7)
        if k == 0:
            return "NULL"
        if k == 1:
            return "'{}'::jsonb"
        if k == 2:
            return "'[]'::jsonb"
        if k == 3:
            return r.choice(["'null'::jsonb", "'1'::jsonb", "'\"s\"'::jsonb"])
        if k == 4:
            depth = r.choice([10, 100, 1000])
            return lit("[" * depth + "]" * depth) + "::jsonb"
        if k == 5:
            return f"jsonb_build_object('task_title', repeat('t', {r.choice([10, 5000, 100000])}))"
        if k == 6:
            return f"jsonb_build_object('task_title', {self.text()}, 'user_id', {self.text()})"
        return "'{\"task_title\": \"x\", \"event_version\": 1}'::jsonb"

    def value_of_type(self, typname):
        """A random value for a column or argument type (by pg_type name)."""
        t = typname
        if t in ("text", "varchar", "name"):
            return self.text()
        if t == "uuid":
            return self.uuid()
        if t == "int8":
            return self.bigint()
        if t in ("int4", "int2"):
            return self.int4()
        if t == "timestamptz":
            return self.timestamptz()
        if t == "jsonb":
            return self.jsonb()
        if t == "xid8":
            return self.r.choice(["NULL", "'0'::xid8", "'1'::xid8", "pg_current_xact_id()", "'18446744073709551615'::xid8"])
        if t == "task_status":
            return self.status()
        if t == "bool":
            return self.r.choice(["NULL", "true", "false"])
        return "NULL"


# --------------------------------------------------------------- fuzzer ---
class Fuzzer:
    def __init__(self, args):
        self.args = args
        self.r = random.Random(args.seed)
        self.g = Gen(self.r, args.long)
        host, port = os.environ.get("PGHOST", ""), os.environ.get("PGPORT", "")
        self.conninfo = f"host={host} port={port} user={os.environ.get('PGUSER', 'postgres')} dbname={args.db} application_name=fuzz"
        self.conn = Conn(self.conninfo)
        self.calls = 0
        self.per_func = {}
        self.states = {}
        self.findings = []
        self.crashes = {}
        self.excluded = set()
        self.low_role = None

    # -- catalog --------------------------------------------------------
    def discover(self):
        c = self.conn
        self.funcs = []
        for oid, name, args, rettype, retset, required in c.q("""
            SELECT p.oid, p.proname,
                   coalesce(array_to_string(array(SELECT t.typname || CASE WHEN t.typcategory = 'A' THEN ':' || e.typname ELSE '' END
                          FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY a(t, n)
                          JOIN pg_type t ON t.oid = a.t LEFT JOIN pg_type e ON e.oid = t.typelem ORDER BY a.n), ','), ''),
                   format_type(p.prorettype, NULL), p.proretset, p.pronargs - p.pronargdefaults
            FROM pg_proc p
            JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                 AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
            JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'task_events'
            WHERE p.prokind = 'f' AND p.prorettype <> 'trigger'::regtype
            ORDER BY p.proname"""):
            self.funcs.append((name, args.split(",") if args else [], rettype, retset == "t", int(required)))
        self.views = [v for (v,) in c.q("""
            SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
                 AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
            JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'task_events'
            WHERE c.relkind IN ('v', 'm') ORDER BY 1""")]
        self.event_cols = c.q("""
            SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
            WHERE a.attrelid = 'task_events.events'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""")

    def refresh_ids(self):
        ok, _, _, rows = self.conn.run("SELECT task_id FROM task_events.tasks ORDER BY random() LIMIT 200")
        if ok and rows:
            self.g.task_ids = [r[0] for r in rows]
        ok, _, _, rows = self.conn.run("SELECT event_id FROM task_events.events ORDER BY random() LIMIT 100")
        if ok and rows:
            self.g.event_ids = [r[0] for r in rows]

    # -- arguments ------------------------------------------------------
    def event_row(self):
        r = self.r
        if r.random() < 0.15:
            return "NULL::task_events.events"
        if r.random() < 0.3:
            return "(SELECT e FROM task_events.events e ORDER BY random() LIMIT 1)"
        vals = []
        for name, typ in self.event_cols:
            if r.random() < 0.25:
                vals.append("NULL")
            elif name == "event_type":
                vals.append(r.choice(["'TaskCreated'", "'TaskCompleted'", "'TaskStatusChanged'", self.g.text()]))
            else:
                vals.append(self.g.value_of_type(typ))
        return "ROW(" + ", ".join(vals) + ")::task_events.events"

    def events_array(self):
        r = self.r
        k = r.randint(0, 11)
        if k == 0:
            return "NULL::task_events.events[]"
        if k == 1:
            return "'{}'::task_events.events[]"
        if k == 2:
            return "ARRAY[NULL::task_events.events]"
        if k == 3:
            return "ARRAY[NULL::task_events.events, NULL, NULL]"
        if k == 4:
            return (f"(SELECT array_agg(x ORDER BY (x).seq) FROM (SELECT e AS x FROM task_events.events e"
                    f" ORDER BY random() LIMIT {r.choice([1, 5, 50, 1000])}) s)")
        if k == 5:
            return "ARRAY[[" + self.event_row() + ", " + self.event_row() + "], [" + self.event_row() + ", " + self.event_row() + "]]"
        if k == 6:
            return "'[3:3]={NULL}'::task_events.events[]"
        if k == 7:
            return f"array_cat('[0:0]={{NULL}}'::task_events.events[], ARRAY[{self.event_row()}])"
        if k == 8:
            n = r.choice([1000, 10000]) if self.args.long or r.random() < 0.3 else 100
            return f"(SELECT array_agg(e) FROM task_events.events e, generate_series(1, {n}) g WHERE e.seq = (SELECT min(seq) FROM task_events.events))"
        if k == 9:
            return "(SELECT array_agg(e) FROM (SELECT e FROM task_events.events e LIMIT 3) s, generate_series(1, 3))"
        return "ARRAY[" + ", ".join(self.event_row() for _ in range(r.randint(1, 4))) + "]"

    def arg_for(self, fname, i, typ):
        g = self.g
        base, _, elem = typ.partition(":")
        if elem == "events" or base == "_events":
            return self.events_array()
        if base == "text" and "handler" in fname or fname in ("process_pending", "retry_dead_letters", "handler_backlog") and base == "text":
            return g.handler_name()
        if base == "int8" and fname in ("update_status", "complete_task"):
            return g.bigint()
        return g.value_of_type(base)

    def call_sql(self, fname, argtypes, rettype, retset, required):
        args = [self.arg_for(fname, i, t) for i, t in enumerate(argtypes)]
        # Sometimes leave the arguments that have defaults out.
        if len(args) > required and self.r.random() < 0.2:
            args = args[: self.r.randint(required, len(args))]
        call = f"task_events.{fname}({', '.join(args)})"
        if retset or rettype.startswith("task_events.") or self.r.random() < 0.2:
            form = self.r.choice(["SELECT * FROM {c}", "SELECT count(*) FROM {c}", "SELECT {c}", "SELECT * FROM {c} LIMIT 1"])
        else:
            form = "SELECT {c}"
        return form.format(c=call)

    # -- running --------------------------------------------------------
    def record(self, label, sql, ctx, ok, code, msg):
        self.calls += 1
        f = self.per_func.setdefault(label, {"calls": 0, "ok": 0, "errors": {}})
        f["calls"] += 1
        if ok:
            f["ok"] += 1
            return
        f["errors"][code or "none"] = f["errors"].get(code or "none", 0) + 1
        if code in self.args.show:
            print(f"fuzz: {label} [{ctx}] {code}: {msg}\n    {sql[:400]}", flush=True)
        self.states[code or "none"] = self.states.get(code or "none", 0) + 1
        if code is None or code.startswith("XX"):
            self.finding("internal-error", label, sql, ctx, f"{code}: {msg}")
        elif code == "57014" and ctx != "timeout" and "statement timeout" in (msg or ""):
            self.finding("slow (30 s timeout)", label, sql, ctx, msg)

    def finding(self, kind, label, sql, ctx, detail):
        shown = sql if len(sql) < 600 else sql[:300] + f" ... [{len(sql)} bytes] ... " + sql[-200:]
        self.findings.append({"kind": kind, "function": label, "context": ctx, "sql": shown, "detail": detail})
        print(f"FINDING {kind}: {label} [{ctx}]: {detail}\n    {shown}", flush=True)

    def lost(self, label, sql, ctx, why):
        self.calls += 1
        self.crashes[label] = self.crashes.get(label, 0) + 1
        self.finding("connection lost (backend crash?)", label, sql, ctx, why.strip().replace("\n", " "))
        if self.crashes[label] >= 3:
            self.excluded.add(label)
            print(f"fuzz: {label} crashed 3 times: no more calls to it in this run", flush=True)
        self.conn.connect()
        self.restore_session()

    def restore_session(self):
        pass

    def run_in_context(self, label, sql, ctx):
        """Run one call in context ctx; returns after recording it."""
        c = self.conn
        pre, post = [], []
        if ctx == "savepoint":
            pre, post = ["BEGIN", "SAVEPOINT s"], ["ROLLBACK TO SAVEPOINT s", "COMMIT"]
        elif ctx == "serializable":
            pre, post = ["BEGIN ISOLATION LEVEL SERIALIZABLE"], ["COMMIT"]
        elif ctx == "repeatable_read":
            pre, post = ["BEGIN ISOLATION LEVEL REPEATABLE READ", "SELECT count(*) FROM task_events.tasks"], ["COMMIT"]
        elif ctx == "read_only":
            pre, post = ["BEGIN READ ONLY"], ["ROLLBACK"]
        elif ctx == "timeout":
            pre, post = ["BEGIN", "SET LOCAL statement_timeout = '1ms'"], ["ROLLBACK"]
        elif ctx == "low_role":
            pre, post = ["BEGIN", f"SET LOCAL ROLE {self.low_role}"], ["COMMIT"]
        elif ctx == "prepare":
            pre, post = ["BEGIN"], ["PREPARE TRANSACTION 'fuzz'", "ROLLBACK PREPARED 'fuzz'"]
        elif ctx == "sql_ascii":
            pre, post = ["SET client_encoding = 'SQL_ASCII'"], ["RESET client_encoding"]
        elif ctx == "batch_size_1":
            pre, post = ["BEGIN", "SET LOCAL task_events.batch_size = 1", "SET LOCAL task_events.max_attempts = 1"], ["COMMIT"]
        try:
            for s in pre:
                c.run(s)
            ok, code, msg, _ = c.run(sql)
            self.record(label, sql if isinstance(sql, str) else sql.decode("latin-1"), ctx, ok, code, msg)
            for s in post:
                ok2, code2, msg2, _ = c.run(s)
                if not ok2 and code2 and code2.startswith("XX"):
                    self.finding("internal-error", label + " (" + s + ")", str(sql)[:300], ctx, f"{code2}: {msg2}")
            if pq.PQtransactionStatus(c.c) != PQTRANS_IDLE:
                c.run("ROLLBACK")   # whatever is left open (a failed COMMIT, ...)
            if ctx == "prepare":
                c.run("ROLLBACK PREPARED 'fuzz'")
        except Lost as e:
            self.lost(label, sql if isinstance(sql, str) else sql.decode("latin-1"), ctx, str(e))

    def pick_context(self):
        r = self.r.random()
        choices = [(0.55, "autocommit"), (0.62, "savepoint"), (0.67, "serializable"), (0.71, "repeatable_read"),
                   (0.75, "read_only"), (0.81, "timeout"), (0.89, "low_role"), (0.92, "prepare"), (0.96, "batch_size_1"),
                   (1.0, "sql_ascii")]
        for p, name in choices:
            if r < p:
                return "autocommit" if name == "low_role" and not self.low_role else name
        return "autocommit"

    def raw_invalid_utf8(self):
        """Invalid UTF-8 sent by the client itself, as a literal argument."""
        r = self.r
        bad = r.choice([b"\xff", b"\xc3(", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80abc", b"ok\xc0\xaf"])
        fn = r.choice([b"create_task(" + b"'u', '" + bad + b"')", b"create_task('" + bad + b"', 't', '" + bad + b"')",
                       b"process_pending('" + bad + b"')", b"update_status('" + bad + b"', 'pending')",
                       b"handler_backlog('" + bad + b"')"])
        return b"SELECT * FROM task_events." + fn

    def set_notify_mode(self, mode):
        c = self.conn
        c.q(f"ALTER SYSTEM SET task_events.notify_mode = '{mode}'")
        c.q("SELECT pg_reload_conf()")
        deadline = time.time() + 10
        while time.time() < deadline:
            c.connect()   # a new session reads the reloaded file at once
            if c.q("SHOW task_events.notify_mode")[0][0] == mode:
                return
            time.sleep(0.2)
        print(f"fuzz: notify_mode did not switch to {mode}", flush=True)

    def seed_data(self):
        c = self.conn
        for i in range(30):
            rows = c.q(f"SELECT task_id FROM task_events.create_task('seed{i % 5}', 'seed task {i}', 'd')")
            tid = rows[0][0]
            for s in self.r.sample(["in_progress", "completed", "cancelled", "pending"], self.r.randint(0, 2)):
                c.run(f"SELECT task_events.update_status('{tid}', '{s}')")

    def setup_role(self):
        c = self.conn
        c.q("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fuzz_low') THEN CREATE ROLE fuzz_low LOGIN; END IF; END$$")
        granted = False
        for role in ("task_events_writer", "task_events_reader"):
            if c.q(f"SELECT count(*) FROM pg_roles WHERE rolname = '{role}'")[0][0] != "0":
                c.q(f"GRANT {role} TO fuzz_low")
                granted = True
        if not granted:
            c.q("GRANT USAGE ON SCHEMA task_events TO fuzz_low")
        self.low_role = "fuzz_low"

    def invariants(self):
        """The log and the tasks agree, whatever the fuzzer threw at them."""
        checks = {
            "task version = its latest event's aggregate_version":
                "SELECT count(*) FROM task_events.tasks t WHERE t.version <> (SELECT max(aggregate_version) FROM task_events.events e WHERE e.aggregate_id = t.task_id)",
            "aggregate_version contiguous from 1 per task":
                "SELECT count(*) FROM (SELECT aggregate_id, count(*) n, min(aggregate_version) lo, max(aggregate_version) hi FROM task_events.events GROUP BY 1) s WHERE lo <> 1 OR hi <> n",
            "every task has a TaskCreated event at version 1":
                "SELECT count(*) FROM task_events.tasks t WHERE NOT EXISTS (SELECT FROM task_events.events e WHERE e.aggregate_id = t.task_id AND e.aggregate_version = 1 AND e.event_type = 'TaskCreated')",
            "completed tasks have completed_at":
                "SELECT count(*) FROM task_events.tasks WHERE (status = 'completed') <> (completed_at IS NOT NULL)",
            "no handler recorded an internal error":
                "SELECT count(*) FROM task_events.handler_state WHERE last_sqlstate LIKE 'XX%'",
            "no dead letter with an internal error":
                "SELECT count(*) FROM task_events.dead_letters WHERE sqlstate LIKE 'XX%'",
        }
        for name, sql in checks.items():
            ok, code, msg, rows = self.conn.run(sql)
            if not ok:
                self.finding("invariant query failed", "invariants", sql, "-", f"{code}: {msg}")
            elif rows[0][0] != "0":
                self.finding("invariant broken", "invariants", sql, "-", f"{name}: {rows[0][0]} row(s)")
            else:
                print(f"invariant ok: {name}", flush=True)

    def fixed_cases(self):
        """The hostile inputs every run tries, whatever the seed."""
        cols = [name for name, _ in self.event_cols]
        def row(**over):
            vals = {"seq": "1", "event_id": "gen_random_uuid()", "event_type": "'TaskCreated'", "event_version": "1",
                    "aggregate_id": "gen_random_uuid()", "aggregate_version": "1", "occurred_at": "now()",
                    "user_id": "'u'", "payload": "'{\"task_title\": \"t\"}'::jsonb", "xact_id": "pg_current_xact_id()"}
            vals.update(over)
            return "ROW(" + ", ".join(vals.get(c, "NULL") for c in cols) + ")::task_events.events"
        arrays = ["NULL::task_events.events[]", "'{}'::task_events.events[]", "ARRAY[NULL::task_events.events]",
                  "ARRAY[NULL::task_events.events, NULL]", "'[3:3]={NULL}'::task_events.events[]",
                  "ARRAY[[NULL::task_events.events, NULL], [NULL, NULL]]",
                  "ARRAY[" + row() + "]", "ARRAY[[" + row() + "], [" + row() + "]]",
                  "ARRAY[" + row(**{c: "NULL" for c in cols}) + "]",
                  "ARRAY[" + row(event_type="NULL") + "]", "ARRAY[" + row(payload="NULL") + "]",
                  "ARRAY[" + row(occurred_at="NULL", seq="NULL") + "]", "ARRAY[" + row(occurred_at="'infinity'") + "]",
                  "ARRAY[" + row(payload="jsonb_build_object('task_title', repeat('x', 9000))") + "]",
                  "(SELECT array_agg(x) FROM (SELECT e AS x FROM task_events.events e LIMIT 5) s, generate_series(1, 400))"]
        handlers = [f[0] for f in self.funcs if any(a.endswith(":events") for a in f[1])]
        cases = [(h, f"SELECT task_events.{h}({a})") for h in handlers for a in arrays]
        big = ["repeat('a', 1048576)", "repeat(' ', 1048576)", "repeat(E'\\u3000', 349525)", "''", "NULL", "' '"]
        cases += [("create_task", f"SELECT * FROM task_events.create_task({a}, {b}, {c})")
                  for a, b, c in [(big[0], "'t'", "NULL"), ("'u'", big[0], "NULL"), ("'u'", "'t'", big[0]),
                                  (big[1], "'t'", "NULL"), ("'u'", big[2], "NULL"), (big[4], big[4], big[4]), (big[3], big[5], big[3])]]
        tid = self.g.task_ids[0] if self.g.task_ids else "00000000-0000-0000-0000-000000000000"
        cases += [("update_status", f"SELECT * FROM task_events.update_status('{tid}', 'in_progress', {v})")
                  for v in ["9223372036854775807", "(-9223372036854775807 - 1)", "-1", "0"]]
        cases += [("update_status", f"SELECT * FROM task_events.update_status('{tid}', {st})")
                  for st in ["'PENDING'", "''", "NULL", "'pending'::text"]]
        cases += [("process_pending", f"SELECT task_events.process_pending({h}, {n})")
                  for h, n in [("NULL", "0"), ("NULL", "-2147483648"), ("NULL", "2147483647"), ("''", "1"), (big[0], "1")]]
        cases += [("retry_dead_letters", f"SELECT task_events.retry_dead_letters({h})") for h in ["''", big[0], "NULL"]]
        cases += [("handler_backlog", f"SELECT * FROM task_events.handler_backlog({h})") for h in ["''", big[0], "NULL"]]
        cases += [("task_history", f"SELECT * FROM task_events.task_history({u})")
                  for u in ["NULL", "'00000000-0000-0000-0000-000000000000'", f"'{tid}'"]]
        cases += [("task_history", f"SELECT task_events.task_history('{tid}')")]
        cases = [(l, q) for l, q in cases if l in {f[0] for f in self.funcs}]
        for label, sql in cases:
            if label not in self.excluded:
                self.run_in_context(label, sql, "autocommit")
        return len(cases)

    def main(self):
        t0 = time.time()
        self.discover()
        self.setup_role()
        self.seed_data()
        self.refresh_ids()
        print(f"fuzz: seed {self.args.seed}, {self.args.calls} calls, {len(self.funcs)} functions: "
              + ", ".join(f[0] for f in self.funcs) + f"; views: {', '.join(self.views)}", flush=True)
        modes = ["relay", "commit", "off"]
        per_mode = self.args.calls // len(modes)
        for mode in modes:
            self.set_notify_mode(mode)
            n = self.fixed_cases()
            print(f"fuzz: notify_mode {mode}: {n} fixed hostile cases run", flush=True)
            for i in range(per_mode):
                if self.args.max_seconds and time.time() - t0 > self.args.max_seconds:
                    print(f"fuzz: time limit of {self.args.max_seconds}s reached after {self.calls} calls", flush=True)
                    break
                if i % 100 == 0:
                    self.refresh_ids()
                k = self.r.random()
                if k < 0.04:
                    label, sql = "client invalid UTF-8", self.raw_invalid_utf8()
                    ctx = self.r.choice(["autocommit", "sql_ascii"])
                elif k < 0.10 and self.views:
                    v = self.r.choice(self.views)
                    label, ctx = "view " + v, self.pick_context()
                    sql = self.r.choice([f"SELECT * FROM {v}", f"SELECT count(*) FROM {v}", f"SELECT * FROM {v} WHERE {self.r.choice(['true', 'false', 'NULL'])}"])
                else:
                    fname, argtypes, rettype, retset, required = self.r.choice(self.funcs)
                    if fname in self.excluded:
                        continue
                    label, ctx = fname, self.pick_context()
                    sql = self.call_sql(fname, argtypes, rettype, retset, required)
                self.run_in_context(label, sql, ctx)
                if self.calls % 500 == 0:
                    print(f"fuzz: {self.calls} calls, {len(self.findings)} findings, {time.time() - t0:.0f}s", flush=True)
        self.set_notify_mode("relay")
        self.conn.run("SELECT task_events.process_pending()")
        self.invariants()
        elapsed = time.time() - t0
        summary = {"seed": self.args.seed, "calls": self.calls, "seconds": round(elapsed, 1),
                   "findings": self.findings, "sqlstates": dict(sorted(self.states.items())),
                   "per_function": self.per_func, "crashes": self.crashes}
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(summary, f, indent=1)
        print("\n==== fuzz: per function (calls, ok, errors by SQLSTATE) ====")
        for name, f in sorted(self.per_func.items()):
            errs = " ".join(f"{k}:{v}" for k, v in sorted(f["errors"].items()))
            print(f"  {name[:40]:40} {f['calls']:6} {f['ok']:6}  {errs}")
        print(f"fuzz: {self.calls} calls in {elapsed:.0f}s; {sum(self.crashes.values())} lost connection(s); "
              f"{len(self.findings)} finding(s)")
        return 1 if self.findings else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--db", default="postgres")
    ap.add_argument("--json")
    ap.add_argument("--max-seconds", type=float, default=0)
    ap.add_argument("--show", default="", help="comma-separated SQLSTATEs whose calls to print (debugging the generator)")
    args = ap.parse_args()
    args.show = set(filter(None, args.show.split(",")))
    sys.exit(Fuzzer(args).main())


if __name__ == "__main__":
    main()

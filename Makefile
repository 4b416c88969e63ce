# task_events: built with PGXS against the server headers of $(PG_CONFIG).
#
#   make && sudo make install      build and install the extension and
#                                  task_events_consume (consumer/)
#   make installcheck              pg_regress, isolation and TAP suites
#   make pgtap                     the pgTAP suite (pg_prove)
#   scripts/test.sh                every test suite (see docs/testing.md)

EXTENSION = task_events
MODULE_big = task_events
OBJS = \
	src/task_events.o \
	src/uuid_v7.o \
	src/spi_util.o \
	src/validate.o \
	src/domain_events.o \
	src/task_domain.o \
	src/event_log.o \
	src/log_origin.o \
	src/event_publish.o \
	src/append_only.o \
	src/wakeup.o \
	src/registry.o \
	src/launcher.o \
	src/utility_hook.o \
	src/commit_horizon.o \
	src/handler_call.o \
	src/call_journal.o \
	src/dispatch.o \
	src/handler_lanes.o \
	src/dead_letters.o \
	src/lost_batch.o \
	src/handler_admin.o \
	src/handler_audit.o \
	src/handler_notification.o \
	src/handler_analytics.o \
	src/handler_relay.o \
	src/worker.o

DATA = $(wildcard task_events--*.sql)

PG_CPPFLAGS = -I$(srcdir)/src/include
# Warning-free under -Wall -Wextra; the two -Wno- flags silence warnings that
# PostgreSQL's own headers and function-manager macros trigger.
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers
SHLIB_LINK = -luuid

# The test suites run against the installed extension, each on throwaway
# servers, as any user but root (docs/testing.md).  make installcheck runs
# pg_regress, isolation and TAP in that order; REGRESS=, ISOLATION= or
# TAP_TESTS= on the command line leaves one out.

# pg_regress suite: sql/*.sql against expected/*.out, on a throwaway instance.
REGRESS = setup create_task update_status errors append_only history handlers dead_letters handler_registry handler_api handler_lanes \
	subscriptions security metrics
REGRESS_OPTS = --temp-instance=tmp_check_regress --temp-config=$(srcdir)/test/regress.conf \
	--encoding=UTF8 --no-locale

# Isolation specs: test/isolation/specs/*.spec against test/isolation/expected/*.out.
ISOLATION = concurrent_transitions late_commit handler_order concurrent_process_pending \
	subscription_one_lane subscription_lease_expiry subscription_late_commit
ISOLATION_OPTS = --inputdir=$(srcdir)/test/isolation --temp-instance=tmp_check_iso \
	--temp-config=$(srcdir)/test/regress.conf --encoding=UTF8 --no-locale

# TAP tests: test/t/*.pl with PostgreSQL::Test::Cluster, through PGXS's
# prove_installcheck (run from $(srcdir); each test's log is
# tmp_check/log/regress_log_<test>).  PROVE_TESTS='test/t/011*.pl' picks
# files, PROVE_FLAGS=--verbose is passed to prove.
TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl

# pgTAP files (make pgtap): test/pgtap/*.sql, unless PGTAP_TESTS names some.
PGTAP_TESTS =

EXTRA_CLEAN = tmp_check tmp_check_regress tmp_check_iso tmp_check_pgtap results output_iso \
	regression.diffs regression.out

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# PGXS tracks no header dependencies (autodepend is off in Debian's build):
# a changed header rebuilds every object, so that none keeps an old layout
# of a struct (a stale dead_letters.o read HandlerState's fields at their
# old offsets once lanes were added).
$(OBJS) $(OBJS:.o=.bc): $(wildcard $(srcdir)/src/include/*.h)

# TaskEventsTest.pm, the TAP tests' helpers (set after the include, which
# defines PG_PROVE_FLAGS; PROVE_FLAGS stays free for the command line).
PG_PROVE_FLAGS += -I $(srcdir)/test/t

# pg_prove on a throwaway server with the installed task_events (test/pgtap/run.sh).
.PHONY: pgtap
pgtap:
	PG_CONFIG='$(PG_CONFIG)' bash $(srcdir)/test/pgtap/run.sh $(PGTAP_TESTS)

# task_events_consume, the subscription consumer program: a PGXS PROGRAM in
# consumer/ with its own Makefile (PGXS uses OBJS for the program too).
.PHONY: consumer-all consumer-install consumer-uninstall consumer-clean
all: consumer-all
install: consumer-install
uninstall: consumer-uninstall
clean: consumer-clean
consumer-all:
	$(MAKE) -C $(srcdir)/consumer PG_CONFIG='$(PG_CONFIG)' all
consumer-install:
	$(MAKE) -C $(srcdir)/consumer PG_CONFIG='$(PG_CONFIG)' install
consumer-uninstall:
	$(MAKE) -C $(srcdir)/consumer PG_CONFIG='$(PG_CONFIG)' uninstall
consumer-clean:
	$(MAKE) -C $(srcdir)/consumer PG_CONFIG='$(PG_CONFIG)' clean

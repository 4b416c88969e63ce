/*
 * call_journal.c
 *		The handler call each worker is in, written down before the call, so
 *		that a call that ends the worker's process is still counted.
 *
 * A handler may end the process that calls it: pg_terminate_backend() of
 * its own pid, a FATAL error, a crash of C code, the kernel's OOM killer.
 * Its transaction is then lost with everything that would have recorded
 * the failure, and without a trace the next worker would call it again,
 * forever.  So before each call a worker writes what it is about to call
 * (database, handler, the events, and the generation of the handler's state
 * row) into its slot of its database's file task_events/calls.<database
 * OID> in the data directory (a worker's slot is its number in its
 * database, so the worker started in its place finds it),
 * and clears the slot once the batch's transaction has ended.  A worker
 * that starts and finds its slot set counts a failed attempt for that call
 * (lost_batch.c, te_record_lost_batch), unless the state row's generation
 * shows the batch committed after all.
 *
 * Only deaths the handler may have caused are counted.  A call cut short by
 * the server stopping (a new postmaster reads the slot: the record names
 * the old one) or by the postmaster's SIGQUIT (an immediate shutdown, or
 * the crash of another process: te_journal_on_quit clears the slot before
 * exiting) is simply made again.  A worker terminated (SIGTERM) or killed
 * (SIGKILL) from outside while in a call is counted: nothing tells that
 * from the handler terminating itself or the OOM killer.
 *
 * Shared memory would not do: a crash of any backend makes the postmaster
 * reinitialize it.  The file is written without fsync: it must survive the
 * process, not the machine (after an operating system crash the lost call
 * is simply made again).  A slot is one write() of a few hundred bytes at
 * its own offset, and a CRC tells a whole record from garbage.
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "miscadmin.h"
#include "port/pg_crc32c.h"
#include "storage/fd.h"

#include "call_journal.h"

#define TE_JOURNAL_DIR "task_events"
#define TE_JOURNAL_MAGIC 0x54454332		/* "TEC2": CalledRange with lane */

typedef struct JournalRecord
{
	uint32		magic;
	Oid			database;
	pid_t		postmaster;		/* PostmasterPid when the call began */
	CalledRange range;
	pg_crc32c	crc;			/* of everything above */
} JournalRecord;

static char te_journal_path[MAXPGPATH];
static int	te_journal_fd = -1;
static int	te_journal_slot = -1;
static bool te_journal_dirty = false;

/* Where this worker's slot begins in the file. */
static off_t
te_journal_offset(void)
{
	return (off_t) te_journal_slot * (off_t) sizeof(JournalRecord);
}

static pg_crc32c
te_journal_crc(const JournalRecord *rec)
{
	pg_crc32c	crc;

	INIT_CRC32C(crc);
	COMP_CRC32C(crc, rec, offsetof(JournalRecord, crc));
	FIN_CRC32C(crc);
	return crc;
}

static void
te_journal_pwrite(const JournalRecord *rec)
{
	if (pwrite(te_journal_fd, rec, sizeof(JournalRecord), te_journal_offset()) != sizeof(JournalRecord))
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not write file \"%s\": %m", te_journal_path)));
}

/*
 * Open the journal for worker slot (0-based) and return the call its
 * previous worker left unfinished, if any, in *range (true) for the current
 * database.  The slot is left as it is until te_journal_clear().  When the
 * file cannot be opened, says so and journals nothing.
 */
bool
te_journal_open(int slot, CalledRange *range)
{
	JournalRecord rec;
	ssize_t		n;

	snprintf(te_journal_path, sizeof(te_journal_path), "%s/calls.%u",
			 TE_JOURNAL_DIR, MyDatabaseId);
	if (MakePGDirectory(TE_JOURNAL_DIR) != 0 && errno != EEXIST)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not create directory \"%s\": %m", TE_JOURNAL_DIR)));
	te_journal_fd = BasicOpenFile(te_journal_path, O_RDWR | O_CREAT | PG_BINARY);
	if (te_journal_fd < 0)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\": %m", te_journal_path),
				 errdetail("A handler call that ends the worker's process will not be counted.")));
		return false;
	}
	te_journal_slot = slot;

	n = pread(te_journal_fd, &rec, sizeof(rec), te_journal_offset());
	if (n != sizeof(rec) || rec.magic != TE_JOURNAL_MAGIC ||
		!EQ_CRC32C(rec.crc, te_journal_crc(&rec)))
		return false;
	te_journal_dirty = true;
	if (rec.database != MyDatabaseId || rec.postmaster != PostmasterPid)
		return false;
	*range = rec.range;
	return true;
}

/* Write down the call about to be made.  A no-op outside a worker. */
void
te_journal_write(const CalledRange *range)
{
	JournalRecord rec;

	if (te_journal_fd < 0)
		return;
	memset(&rec, 0, sizeof(rec));
	rec.magic = TE_JOURNAL_MAGIC;
	rec.database = MyDatabaseId;
	rec.postmaster = PostmasterPid;
	rec.range = *range;
	rec.crc = te_journal_crc(&rec);
	te_journal_pwrite(&rec);
	te_journal_dirty = true;
}

/* The batch's transaction ended (either way): forget its calls. */
void
te_journal_clear(void)
{
	JournalRecord rec;

	if (te_journal_fd < 0 || !te_journal_dirty)
		return;
	memset(&rec, 0, sizeof(rec));
	te_journal_pwrite(&rec);
	te_journal_dirty = false;
}

/*
 * SIGQUIT handler of a worker: the postmaster ends every process at once
 * (immediate shutdown, or another process crashed).  The call in progress,
 * if any, is not the handler's doing: clear the slot, then exit as
 * PostgreSQL's own handler does.  pwrite and _exit are async-signal-safe.
 */
void
te_journal_on_quit(SIGNAL_ARGS)
{
	static const JournalRecord cleared;
	ssize_t		written pg_attribute_unused();

	if (te_journal_fd >= 0 && te_journal_dirty)
		written = pwrite(te_journal_fd, &cleared, sizeof(cleared), te_journal_offset());
	_exit(2);
}

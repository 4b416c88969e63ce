/*
 * validate.c
 *		Checks on the arguments of the SQL-callable functions.
 *
 * Every check raises the documented SQLSTATE before anything is written:
 * NULL 22004, empty or whitespace-only 22023, too long 22001.  Lengths are
 * counted in characters of the database encoding, not in bytes.
 */
#include "postgres.h"

#include "mb/pg_wchar.h"
#include "utils/builtins.h"

#include "validate.h"

/*
 * Is the Unicode code point white space?  ASCII blanks plus the Unicode
 * White_Space characters a user is likely to paste (no-break space, the
 * typographic spaces, line and paragraph separators, ideographic space) and
 * the zero-width no-break space (BOM).
 */
static bool
te_is_space_codepoint(pg_wchar c)
{
	switch (c)
	{
		case ' ':
		case '\t':
		case '\n':
		case '\v':
		case '\f':
		case '\r':
		case 0x85:
		case 0xA0:
		case 0x1680:
		case 0x2028:
		case 0x2029:
		case 0x202F:
		case 0x205F:
		case 0x3000:
		case 0xFEFF:
			return true;
		default:
			return c >= 0x2000 && c <= 0x200B;
	}
}

/*
 * Does the string hold only white space?  Outside UTF-8 databases only the
 * ASCII blanks are recognised.
 */
static bool
te_is_blank(const char *str, int len)
{
	bool		utf8 = (GetDatabaseEncoding() == PG_UTF8);
	const char *p = str;
	const char *end = str + len;

	while (p < end)
	{
		int			charlen = pg_mblen(p);
		pg_wchar	c;

		if (utf8)
			c = utf8_to_unicode((const unsigned char *) p);
		else
			c = (charlen == 1) ? (unsigned char) *p : 0x110000;
		if (!te_is_space_codepoint(c))
			return false;
		p += charlen;
	}
	return true;
}

/* Raise 22004 when argument argno is NULL. */
void
te_require_not_null(FunctionCallInfo fcinfo, int argno, const char *argname)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", argname)));
}

/* Raise 22001 when str is longer than max_chars characters. */
static void
te_check_length(const char *str, int len, const char *argname, int max_chars)
{
	int			nchars = pg_mbstrlen_with_len(str, len);

	if (nchars > max_chars)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("%s is too long (%d characters)", argname, nchars),
				 errdetail("The maximum length of %s is %d characters.",
						   argname, max_chars)));
}

/*
 * Return text argument argno as a C string after checking that it is not
 * NULL, not blank and at most max_chars characters long.
 */
char *
te_required_text_arg(FunctionCallInfo fcinfo, int argno,
					 const char *argname, int max_chars)
{
	text	   *arg;
	char	   *str;
	int			len;

	te_require_not_null(fcinfo, argno, argname);
	arg = PG_GETARG_TEXT_PP(argno);
	str = VARDATA_ANY(arg);
	len = VARSIZE_ANY_EXHDR(arg);

	if (te_is_blank(str, len))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", argname),
				 len == 0 ? 0 :
				 errdetail("The %s given holds only white space (%d bytes).",
						   argname, len)));
	te_check_length(str, len, argname, max_chars);
	return text_to_cstring(arg);
}

/*
 * Return text argument argno as a C string, or NULL when it is NULL, after
 * checking that it is at most max_chars characters long.
 */
char *
te_optional_text_arg(FunctionCallInfo fcinfo, int argno,
					 const char *argname, int max_chars)
{
	text	   *arg;

	if (PG_ARGISNULL(argno))
		return NULL;
	arg = PG_GETARG_TEXT_PP(argno);
	te_check_length(VARDATA_ANY(arg), VARSIZE_ANY_EXHDR(arg), argname, max_chars);
	return text_to_cstring(arg);
}

/* validate.h: argument checks shared by the SQL-callable functions */
#ifndef TE_VALIDATE_H
#define TE_VALIDATE_H

#include "fmgr.h"

/* Character limits of the text arguments. */
#define TE_MAX_USER_ID_CHARS		200
#define TE_MAX_TITLE_CHARS			500
#define TE_MAX_DESCRIPTION_CHARS	10000

extern void te_require_not_null(FunctionCallInfo fcinfo, int argno, const char *argname);
extern char *te_required_text_arg(FunctionCallInfo fcinfo, int argno,
								  const char *argname, int max_chars);
extern char *te_optional_text_arg(FunctionCallInfo fcinfo, int argno,
								  const char *argname, int max_chars);

#endif

/* log_origin.h: whose transaction ids the event log holds */
#ifndef TE_LOG_ORIGIN_H
#define TE_LOG_ORIGIN_H

extern void te_require_native_log(void);
extern void te_report_log_in_future(void);

#endif

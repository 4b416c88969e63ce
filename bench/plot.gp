# plot.gp: throughput against client count, one panel per workload, one line
# per implementation.  bench.sh runs it as
#   gnuplot -e "datafile='.../throughput.csv'; outfile='.../throughput.png'" plot.gp
# The rows are sorted by workload, variant and client count first, so that
# each line is one run of consecutive rows.
set datafile separator ','
set terminal pngcairo size 1400,560 font 'sans,10'
set output outfile
set multiplot layout 1,2 title 'task\_events: throughput against concurrent clients (higher is better)'
set logscale x 2
set xrange [0.8:80]
set xtics (1, 2, 4, 8, 16, 32, 64)
set grid ytics
set key top left font 'sans,9'
set ylabel 'transactions/s (pgbench)'
set xlabel 'clients'
set yrange [0:*]
variants = 'ext_commit ext_relay ext_off plpgsql_notify plpgsql_nonotify ceiling_write ceiling_pipeline pgq'
titles = 'ext-commit ext-relay ext-off PL/pgSQL+NOTIFY PL/pgSQL ceiling-write ceiling-pipeline PgQ'
# Extension: solid; PL/pgSQL and PgQ: solid; ceilings: dashed.
set linetype 1 lc rgb '#d62728' lw 2 pt 7
set linetype 2 lc rgb '#2ca02c' lw 2 pt 7
set linetype 3 lc rgb '#17becf' lw 2 pt 7
set linetype 4 lc rgb '#1f77b4' lw 2 pt 5
set linetype 5 lc rgb '#9467bd' lw 2 pt 5
set linetype 6 lc rgb '#7f7f7f' lw 2 pt 4 dt 2
set linetype 7 lc rgb '#000000' lw 2 pt 4 dt 2
set linetype 8 lc rgb '#ff7f0e' lw 2 pt 9
sel(w, v) = (strcol(1) eq w && strcol(2) eq v && strcol(5) ne '') ? column(5) : NaN
do for [w in 'create_task lifecycle'] {
	set title (w eq 'create_task' ? 'create\_task (1 transaction, 1 event)' : 'lifecycle: create, start, complete (3 transactions, 4 events)')
	plot for [i=1:words(variants)] '< tail -n +2 '.datafile.' | sort -t, -k1,1 -k2,2 -k3,3n' using 3:(sel(w, word(variants, i))) \
		with linespoints lt i title word(titles, i)
}
unset multiplot

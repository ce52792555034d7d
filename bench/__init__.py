"""Every stage's benchmarks in one place: `python -m bench` (`make bench`) runs each stage's benchmark module
(bench.train_step, bench.stream, bench.precompute, bench.merge, bench.memory, bench.precompute_memory) as
its own process and puts their rows (bench.row.Row) in one table and one results file; `python -m
bench.gpu_check` (`make gpu-check`) is the first session on a GPU. The results files of earlier runs sit
beside the modules, as bench/results-<device>-<date>.json."""

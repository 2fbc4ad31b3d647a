# `make demo` (run.py) and the throwaway PostgreSQL cluster it, the benchmarks and the end-to-end
# tests take their backups from (sample.py).

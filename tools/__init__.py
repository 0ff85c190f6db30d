"""The machinery around ok_rtrl.py: the runners' shared library and their files, sweeps, figures
and the benchmark, with their tests. Run the tools from the top of the repository:
python -m tools.sweep, python -m tools.plot_results, python -m tools.bench."""

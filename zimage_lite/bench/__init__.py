"""The benchmark harness behind `zimage-lite bench`: every precision against the BF16 reference.

`runner` runs the generations, `metrics` scores them, `report` writes report.json / report.md and `draw`
the grid and the quality-vs-time plot. Importing this package imports nothing heavy.
"""

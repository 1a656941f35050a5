"""disttrain planner: hardware model, profiler, cost model, MIP search, plan schema.

Importable without the runtime: nothing here imports `disttrain`.
"""

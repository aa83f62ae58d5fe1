"""How onboardflow runs.

Settings, paths, the local (Prism) and Flink runners, the CLI, the simulator, service scripts.
"""

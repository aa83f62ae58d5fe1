"""How onboardflow runs: the command line, the local (Prism) and Flink runners, services."""

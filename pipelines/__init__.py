"""The engine shells and the jobs built from them.

beam/ (one module per stage), onboarding.py, train.py, options.py.
"""

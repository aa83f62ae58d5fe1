"""The simulator: synthetic onboarding journeys (``generator``) and population designs with
ground truth (``populations``)."""
